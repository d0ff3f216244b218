"""Oracle, not a product path: how far does fine-tuning the whole backbone go on the clothing set?

The product fine-tunes in numpy (the head, and the backbone's last conv or last block). This
script asks whether re-training deeper layers would reach the training targets at all, with
PyTorch (the CPU build that the reference tests install, or a GPU where one is lent; about
37 minutes per lite0 run on this 2-core machine). PyTorch is never a service dependency.
It runs the same ONNX graph that the service runs (read node by node into torch ops), the
same sender split, shots and head (power-normalised, standardised pooled features, a 512-unit ReLU
layer, a cosine classifier at scale 16, label smoothing 0.1; embedding = unit(hidden) ⊕
unit(class probabilities)), with a fixed recipe: nothing is chosen on the test split.

    python -m bench.oracle_finetune pack          # here: var/oracle/ (images, split, models)
    python -m bench.oracle_finetune train --out D --runs M:TUNE:SHOTS:SEED,...  # GPU or CPU
    python -m bench.oracle_finetune score D [D ...] --trained-on WHERE  # test figures, appended
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np

ORACLE = Path("var/oracle")
MEAN, STD = 0.4980392156862745, 0.5019607843137255
# Blocks at the last feature resolution (the last two stages of EfficientNet-Lite).
TOP_BLOCK = {"efficientnet-lite0": 11, "efficientnet-lite2": 15}
SIZES = {"efficientnet-lite0": (256, 224), "efficientnet-lite2": (297, 260)}  # resize, crop
# The square root's input floor: at 0 its slope is infinite, and a channel that the backbone's
# activation zeroes made the first whole-backbone run's loss NaN.
FLOOR = 1e-6
SQUARE = 297  # the packed photos: the central square of the shorter side, at 297 px


def pack() -> None:
    """Write the photos (central square, WebP), labels, split and shots, and fp16 models."""
    import onnx
    from onnx import numpy_helper
    from PIL import Image

    from bench.harness import CLOTHING, clothing_labels
    from bench.training import sender_split
    from service.training.service import pick_shots

    rows = clothing_labels()
    labels, _, train_idx, test_idx, classes, _ = sender_split(rows)
    blobs = []
    for r in rows:
        img = Image.open(CLOTHING / r["file"])
        img.draft("RGB", (2 * SQUARE, 2 * SQUARE))
        img = img.convert("RGB")
        scale = SQUARE / min(img.size)
        img = img.resize((max(SQUARE, round(img.width * scale)),
                          max(SQUARE, round(img.height * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - SQUARE) // 2, (img.height - SQUARE) // 2
        buf = io.BytesIO()
        img.crop((left, top, left + SQUARE, top + SQUARE)).save(buf, "WEBP", quality=82)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    ORACLE.mkdir(parents=True, exist_ok=True)
    lens = np.array([len(b) for b in blobs])
    np.savez(ORACLE / "data.npz", blob=np.concatenate(blobs),
             offsets=np.concatenate([[0], np.cumsum(lens)]),
             y=np.array([classes.index(v) if v in classes else -1 for v in labels]),
             labels=labels, train=train_idx, test=test_idx,
             **{f"shots10_{s}": pick_shots(labels, train_idx, classes, 10, s) for s in range(3)})
    for name in SIZES:
        model = onnx.load(f"var/models/{name}/model.onnx")
        for init in model.graph.initializer:  # halves what travels; fine-tuning starts in fp32
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.size > 64:
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
        onnx.save(model, ORACLE / f"{name}.onnx")
    print(f"{len(rows)} photos, {lens.sum() / 2**20:.1f} MiB")


def torch_net(path: Path):  # noqa: ANN201 - torch is imported lazily
    """The ONNX backbone up to its pooled embedding as a torch module."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    weights = {i.name: numpy_helper.to_array(i).astype(np.float32)
               for i in model.graph.initializer}

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = torch.nn.ParameterDict()
            self.keys: dict[str, str] = {}
            self.nodes = []
            for node in model.graph.node:
                if node.op_type == "Gemm":
                    continue  # the ImageNet classifier: not part of the embedding
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Conv":
                    for name in node.input[1:]:
                        key = name.replace(".", "_")
                        self.keys[name] = key
                        self.params[key] = torch.nn.Parameter(torch.from_numpy(weights[name]))
                if node.op_type == "Clip":
                    attrs = {"min": float(weights[node.input[1]]),
                             "max": float(weights[node.input[2]])}
                self.nodes.append((node.op_type, list(node.input), node.output[0], attrs))

        def forward(self, x):  # noqa: ANN001, ANN202
            env = {"image": x}
            for op, inputs, output, attrs in self.nodes:
                a = env[inputs[0]]
                if op == "Conv":
                    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
                    if (top, left) != (bottom, right):
                        a, pad = F.pad(a, (left, right, top, bottom)), 0
                    else:
                        pad = (top, left)
                    bias = self.params[self.keys[inputs[2]]] if len(inputs) > 2 else None
                    env[output] = F.conv2d(a, self.params[self.keys[inputs[1]]], bias,
                                           stride=attrs.get("strides", [1, 1]), padding=pad,
                                           groups=attrs.get("group", 1))
                elif op == "Clip":
                    env[output] = a.clamp(attrs["min"], attrs["max"])
                elif op == "Add":
                    env[output] = a + env[inputs[1]]
                elif op == "GlobalAveragePool":
                    env[output] = a.mean(dim=(2, 3), keepdim=True)
                elif op == "Flatten":
                    env[output] = a.flatten(1)
                else:
                    raise ValueError(f"unsupported op {op}")
            return env["embedding"]

    return Net()


def train(out: Path, runs: list[str], device: str = "cuda", limit: int | None = None,
          budget: float = math.inf) -> None:
    """Fit each run ("<model>:<tune>:<shots|all>:<seed>") and save its test embeddings."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    data = np.load(ORACLE / "data.npz")
    count = len(data["y"]) if limit is None else limit
    photos = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(
        data["blob"][data["offsets"][i]:data["offsets"][i + 1]].tobytes())).convert("RGB")).copy())
        for i in range(count)]).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(data["y"][:count]).to(device)
    test = data["test"][data["test"] < count]
    classes = int(data["y"].max()) + 1
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - appended run by run
    saved: dict[str, dict[str, np.ndarray]] = {name: {} for name in SIZES}

    def centre(idx: np.ndarray, resize: int, size: int) -> torch.Tensor:
        x = photos[torch.from_numpy(idx).to(device)].float()
        if resize != SQUARE:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True,
                              align_corners=False)
        o = (resize - size) // 2
        return ((x[:, :, o:o + size, o:o + size] / 255 - MEAN) / STD).contiguous(
            memory_format=torch.channels_last)

    def augment(idx: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
        # Random resized crops (area 35-100 % of the square, aspect 3:4 to 4:3) and mirrors,
        # batched as affine sampling grids.
        n = len(idx)
        area = torch.empty(n, device=device).uniform_(0.35, 1.0, generator=gen)
        ratio = torch.exp(torch.empty(n, device=device).uniform_(
            math.log(3 / 4), math.log(4 / 3), generator=gen))
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (torch.rand(n, device=device, generator=gen) * 2 - 1) * (1 - sx)
        ty = (torch.rand(n, device=device, generator=gen) * 2 - 1) * (1 - sy)
        flip = torch.where(torch.rand(n, device=device, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        x = F.grid_sample(photos[idx].float(), grid, mode="bilinear", align_corners=False)
        return ((x / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)

    began = time.perf_counter()
    for spec in runs:
        if time.perf_counter() - began > budget:
            print(f"budget spent: {spec} and later runs skipped", flush=True)
            break
        model_name, tune, shots, seed = spec.split(":")
        started = time.perf_counter()
        torch.manual_seed(int(seed))
        gen = torch.Generator(device=device).manual_seed(int(seed))
        resize, size = SIZES[model_name]
        net = torch_net(ORACLE / f"{model_name}.onnx").to(device).to(
            memory_format=torch.channels_last)
        fit = data["train"] if shots == "all" else data[f"shots{shots}_{seed}"]
        fit = fit[fit < count]
        tuned = []
        for key, p in net.params.items():
            block = int(key.split("_")[2]) if key.startswith("_blocks_") else None
            p.requires_grad_(tune == "all" or (tune != "none" and key.startswith("_conv_head"))
                             or (tune == "top" and block is not None
                                 and block >= TOP_BLOCK[model_name]))
            if p.requires_grad:
                tuned.append(p)

        def embed(idx: np.ndarray, net=net, resize: int = resize,  # noqa: ANN001
                  size: int = size) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                return torch.cat([net(centre(idx[i:i + 256], resize, size)).float()
                                  for i in range(0, len(idx), 256)])

        root = torch.sqrt(embed(fit).clamp(min=FLOOR))
        mean, std = root.mean(0), root.std(0) + 1e-6
        hidden = torch.nn.Linear(root.shape[1], 512).to(device)
        torch.nn.init.kaiming_normal_(hidden.weight)
        torch.nn.init.zeros_(hidden.bias)
        w = torch.nn.Parameter(torch.randn(512, classes, device=device) / math.sqrt(512))

        def head(pooled: torch.Tensor, training: bool, hidden=hidden,  # noqa: ANN001
                 mean: torch.Tensor = mean, std: torch.Tensor = std,
                 w: torch.Tensor = w) -> tuple[torch.Tensor, torch.Tensor]:
            h = F.relu(hidden((torch.sqrt(pooled.clamp(min=FLOOR)) - mean) / std))
            d = F.dropout(h, 0.5, training)
            return 16 * F.normalize(d, dim=1) @ F.normalize(w, dim=0), h

        groups = [{"params": [*hidden.parameters(), w], "lr": 1e-3, "weight_decay": 1e-4}]
        if tuned:
            groups.append({"params": tuned, "lr": 2e-4, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        epochs, batch = (15, 64) if shots == "all" else (60, 32)
        steps = epochs * math.ceil(len(fit) / batch)
        warm = math.ceil(len(fit) / batch)  # one epoch of the head alone before the backbone
        base = [g["lr"] for g in opt.param_groups]
        fit_t = torch.from_numpy(fit).to(device)
        step = 0
        for epoch in range(epochs):
            order = fit_t[torch.randperm(len(fit_t), device=device, generator=gen)]
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                decay = 0.5 * (1 + math.cos(math.pi * step / steps))
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * decay * (0.0 if g is not opt.param_groups[0]
                                            and step < warm else 1.0)
                with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                    pooled = net(augment(idx, size, gen)).float()
                logits, _ = head(pooled, True)
                loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            print(f"{spec} epoch {epoch + 1}: loss {float(loss.detach()):.3f}, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
        with torch.no_grad():
            pooled = embed(test)
            logits, h = head(pooled, False)
            emb = torch.cat([F.normalize(h, dim=1), F.normalize(logits.softmax(1), dim=1)], 1)
        saved[model_name][spec] = emb.cpu().numpy().astype(np.float16)
        # One file per backbone, rewritten after each run: few files come back from the GPU.
        np.savez(out / f"embeddings-{model_name}.npz", **saved[model_name])
        record = {"run": spec, "fit": len(fit), "epochs": epochs, "loss": float(loss.detach()),
                  "seconds": round(time.perf_counter() - started, 1),
                  "map": round(_quick_map(emb, y[torch.from_numpy(test).to(device)]), 4)}
        print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()


def _quick_map(emb, labels) -> float:  # noqa: ANN001 - torch tensors
    """Macro mAP, each test image against the others (the service's metric, for the log)."""
    import torch

    sims = emb @ emb.T
    sims.fill_diagonal_(-math.inf)
    order = sims.argsort(dim=1, descending=True)[:, :-1]
    rel = (labels[order] == labels[:, None]).float()
    hits = rel.cumsum(1)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device)
    ap = (hits / ranks * rel).sum(1) / rel.sum(1).clamp(min=1)
    return float(ap[rel.sum(1) > 0].mean())


def score(outs: list[Path], trained_on: str) -> None:
    """Score the saved test embeddings (of one or more train runs) with the service's metric;
    append the table."""
    from bench.harness import append_results
    from service.evaluation.metrics import exact_cosine_scores

    data = np.load(ORACLE / "data.npz")
    labels = data["labels"][data["test"]].tolist()
    log = {json.loads(line)["run"]: (out, json.loads(line)) for out in outs
           for line in (out / "log.jsonl").read_text().splitlines()}
    lines = [f"Trained on: {trained_on}. Same sender split, shots and head as bench/training.py;"
             " the backbone run from its ONNX graph in PyTorch, re-trained from `tune` up "
             "(`none`: head only; `last-conv`: the head conv; `top`: the blocks at the last "
             "feature resolution and the head conv; `all`: every layer) with AdamW (head 1e-3, "
             "backbone 2e-4 after one epoch of the head alone, cosine decay), random resized "
             "crops (35-100 % of the area) and mirrors drawn afresh each step; all images: 15 "
             "epochs of batch 64, 10 shots: 60 epochs of batch 32. One fixed recipe, nothing "
             "chosen on test.", "",
             "| backbone | tune | fitted on | test mAP | test P@10 | fit s |",
             "|---|---|---|---|---|---|"]
    for spec, (out, record) in log.items():
        model_name, tune, shots, seed = spec.split(":")
        emb = np.load(out / f"embeddings-{model_name}.npz")[spec].astype(np.float32)
        s = exact_cosine_scores(emb, labels, ks=(10,))
        fitted = "all training images" if shots == "all" else f"{shots} shots, draw {seed}"
        lines.append(f"| {model_name} | {tune} | {fitted} | {s.mean_ap:.3f} | "
                     f"{s.precision[10]:.3f} | {record['seconds']:.0f} |")
    append_results("Oracle: the whole backbone fine-tuned (PyTorch; not a product path)",
                   "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack")
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--runs", required=True, help="comma-separated model:tune:shots:seed")
    t.add_argument("--device", default="cuda")
    t.add_argument("--limit", type=int, default=None, help="only the first N photos (a dry run)")
    t.add_argument("--budget", type=float, default=math.inf,
                   help="start no run after this many seconds")
    s = sub.add_parser("score")
    s.add_argument("out", type=Path, nargs="+")
    s.add_argument("--trained-on", required=True, help="where `train` ran, for the record")
    args = parser.parse_args()
    if args.command == "pack":
        pack()
    elif args.command == "train":
        train(args.out, args.runs.split(","), args.device, args.limit, args.budget)
    else:
        score(args.out, args.trained_on)


if __name__ == "__main__":
    main()
