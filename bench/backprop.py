"""One training step through the whole backbone: onnxruntime backward graphs against PyTorch.

`service.training.backprop` builds the backward pass as ONNX graphs; this times a forward
and backward pass of a batch (gradients of every conv weight, given the embedding's
gradient) by those graphs in onnxruntime and by PyTorch's autograd on the same graph
(bench.oracle_finetune.torch_net, the CPU build of the reference tests), interleaved, as
ms per image and their ratio.

    python -m bench.backprop [--models efficientnet-lite0,efficientnet-lite2] [--batch 32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from bench.harness import append_results
from service.config import load_settings
from service.embedding import registry
from service.training.backprop import build
from service.training.steps import StepRunner

ROUNDS = 3


def timings(model_name: str, batch: int) -> tuple[float, float]:
    """Best ms per image of a training step, onnxruntime and PyTorch, over ROUNDS rounds."""
    import torch

    from bench.oracle_finetune import torch_net

    model_dir = Path(load_settings()["MODEL_DIR"])
    info = registry.verify(model_dir, model_name)
    path = registry.model_path(model_dir, model_name) / "model.onnx"
    size = info.preprocessing.size
    graphs = build(onnx.load(path), start=info.input_name, input_shape=(3, size, size))
    runner = StepRunner(graphs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    g = rng.normal(size=(batch, 1280)).astype(np.float32)

    def ort_step() -> None:
        _, saved = runner.forward(x, graphs.weights)
        runner.backward(saved, graphs.weights, g)

    net = torch_net(path)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)

    def torch_step() -> None:
        net.zero_grad()
        (net(xt) * gt).sum().backward()

    best = {ort_step: np.inf, torch_step: np.inf}
    for fn in best:
        fn()  # warm-up: first runs allocate
    for _ in range(ROUNDS):
        for fn in best:
            best[fn] = min(best[fn], _ms_per_image(fn, batch))
    return best[ort_step], best[torch_step]


def _ms_per_image(fn: Callable[[], None], batch: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000 / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0,efficientnet-lite2")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    lines = [f"A forward and backward pass of a batch of {args.batch} (every conv weight's "
             f"gradient), best of {ROUNDS} interleaved rounds.", "",
             "| backbone | onnxruntime graphs ms/image | PyTorch autograd ms/image | "
             "PyTorch / onnxruntime |", "|---|---|---|---|"]
    for model_name in args.models.split(","):
        ours, theirs = timings(model_name, args.batch)
        lines.append(f"| {model_name} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f} |")
        print(lines[-1], flush=True)
    append_results("Whole-backbone training step: onnxruntime backward graphs against PyTorch",
                   "\n".join(lines))


if __name__ == "__main__":
    main()
