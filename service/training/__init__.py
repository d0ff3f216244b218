"""Learned retrieval heads on a backbone's pooled features, exported as ONNX (no PyTorch)."""
