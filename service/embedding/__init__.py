"""Embedding: model registry, ONNX Runtime sessions and preprocessing."""
