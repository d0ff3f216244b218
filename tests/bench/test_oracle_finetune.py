"""The oracle fine-tunes the service's own ONNX graph, every conv of it, in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import DEFAULT_MODEL

torch = pytest.importorskip("torch")  # a reference-test dependency, installed by `make test`

from bench.oracle_finetune import torch_net  # noqa: E402 - needs torch


def test_torch_net_computes_the_onnx_embedding(model_dir: Path) -> None:
    path = model_dir / DEFAULT_MODEL / "model.onnx"
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ours = torch_net(path)(torch.from_numpy(x)).numpy()
    expected = ort.InferenceSession(str(path)).run(["embedding"], {"image": x})[0]
    assert ours.shape == expected.shape == (2, 1280)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # Every conv weight and bias is a parameter to fine-tune (the stem's and the head's too).
    net = torch_net(path)
    assert any(k.startswith("_conv_stem") for k in net.params)
    assert sum(p.numel() for p in net.params.values()) > 3_000_000
