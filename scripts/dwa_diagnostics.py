"""What becomes of an earlier task's masks in a DWA run, read from the run's per-task checkpoints.

    python train.py method=dwa dataset=split_mnist ... hydra.run.dir=RUN     # any finished DWA run
    python scripts/dwa_diagnostics.py RUN [--samples 256] [--out RUN/dwa_diagnostics.json]

For each task j, from the checkpoint written at its end and at each later task's end, on ``--samples`` of its
test inputs (docs/methods.md, "DWA: what lifelong implements", says what the numbers showed):

* ``masks``: per masked layer, the relative change ``|M_k - M_j| / |M_j|`` of the masks task j's inputs get, and
  the fraction of mask entries whose sign flipped (tanh gates);
* ``top_fisher``: the mean ``|M|`` task j's inputs get on task j's top-1 % Fisher weights of each layer (the
  Fisher DWA merged; task j's own is recovered from the running mean), at its end and after each later task;
* ``cosines``: at the stream's end, the cosines between the tasks' mean embeddings and mean masks, and the
  embeddings' spread within a task beside the distance between task means;
* ``held`` (``protection=hard``): the fraction of each masked layer's weights held after each task;
* ``swap``: the final network with one of its parts (stem, processor, generators, masked weights) restored
  from task j's end, tested on task j: a part whose restoring brings task j back is where it was forgotten.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict
from torch import Tensor

from lifelong import evaluate
from lifelong.checkpoints import read_checkpoint
from lifelong.cli import build
from lifelong.methods.base import wrapped_net
from lifelong.methods.dwa import DWA, DWANet
from lifelong.models.module import ContinualClassifier

PARTS = ("stem", "processor", "generators", "masked")
TOP_FISHER = 0.01  # the fraction of a layer's weights counted as a task's most important


def _checkpoints(run: Path) -> list[dict[str, Any]]:
    paths = sorted((run / "checkpoints").glob("task_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))
    if not paths:
        sys.exit(f"error: {run}/checkpoints holds no task_<k>.ckpt: give the folder of a finished DWA run")
    return [read_checkpoint(p) for p in paths]


def _inputs(module: ContinualClassifier, stream: Any, task: int, samples: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` test inputs of ``task`` (and their task ids), as the stream's batches."""
    out, count = [], 0
    for batch in stream.loader(stream.test_data(task), train=False):
        out.append((batch.x, batch.task))
        count += batch.x.shape[0]
        if count >= samples:
            break
    return out


def _net(module: ContinualClassifier) -> DWANet:
    return wrapped_net(module, DWANet, "dwa")


def _masks(module: ContinualClassifier, x: Tensor, task: Tensor) -> tuple[list[Tensor], Tensor]:
    net = _net(module)
    masks = net.masks(x, task)
    assert net.embedding is not None
    return masks, net.embedding


def _own_fisher(states: list[dict[str, Any]], key: str) -> list[dict[str, Tensor]]:
    """Each finished task's own Fisher, from the running means ``F(k) = (F_k + k F(k-1)) / (k + 1)``."""
    means = [s["callbacks"][key]["fisher"] for s in states if s["callbacks"][key]["num_fishers"]]
    own = []
    for k, mean in enumerate(means[: len(states) - 1]):  # the last task's is not computed (nothing uses it)
        own.append({n: (k + 1) * f - k * means[k - 1][n] if k else f for n, f in mean.items()})
    return own


@torch.no_grad()
def diagnose(run: Path, samples: int, root: str | None) -> dict[str, Any]:
    states = _checkpoints(run)
    cfg = OmegaConf.create(states[0]["lifelong"]["info"]["config"])
    if root is not None:
        with open_dict(cfg):
            cfg.dataset.root = root
    stream, module, methods = build(cfg)
    method = methods[0]
    if not isinstance(method, DWA):
        sys.exit(f"error: {run} is a run of {type(method).__name__}, not of DWA")
    num_tasks = stream.num_tasks
    if len(states) != num_tasks:
        sys.exit(f"error: {run} holds {len(states)} of its stream's {num_tasks} task checkpoints: a finished run only")
    module.eval()
    last = num_tasks - 1
    fishers = _own_fisher(states, method.state_key)
    net = _net(module)
    names = {id(p): n for n, p in module.named_parameters()}
    parts = {part: [names[id(p)] for p in params] for part, params in net.components().items()}
    weight_names = [names[id(layer.weight)] for layer in net.masked]

    def at(k: int) -> ContinualClassifier:
        copy_ = copy.deepcopy(module)
        copy_.load_state_dict(states[k]["state_dict"])
        return copy_.eval()

    report: dict[str, Any] = {"run": str(run), "samples": samples, "layers": net.masked_names, "tasks": []}
    inputs = [_inputs(module, stream, j, samples) for j in range(num_tasks)]
    final = at(last)
    for j in range(num_tasks):
        ref = at(j)
        entry: dict[str, Any] = {"task": j + 1, "masks": [], "top_fisher": []}
        tops = None
        if j < len(fishers):
            tops = []
            for n in weight_names:
                f = fishers[j][n].flatten()
                tops.append(f.topk(max(1, math.ceil(TOP_FISHER * f.numel()))).indices)
        for k in range(j, num_tasks):
            cur = ref if k == j else at(k)
            diff = [0.0] * len(weight_names)
            norm = [0.0] * len(weight_names)
            flips = [0.0] * len(weight_names)
            top = [0.0] * len(weight_names)
            count = 0
            for x, t in inputs[j]:
                old, _ = _masks(ref, x, t)
                new, _ = _masks(cur, x, t)
                for i, (m0, m1) in enumerate(zip(old, new, strict=True)):
                    diff[i] += float((m1 - m0).square().sum())
                    norm[i] += float(m0.square().sum())
                    flips[i] += float((m0.sign() != m1.sign()).float().mean(tuple(range(1, m0.ndim))).sum())
                    if tops is not None:
                        top[i] += float(m1.abs().flatten(1)[:, tops[i]].mean(1).sum())
                count += x.shape[0]
            entry["masks"].append(
                {
                    "after_task": k + 1,
                    "relative_change": [math.sqrt(d / max(n, 1e-30)) for d, n in zip(diff, norm, strict=True)],
                    "sign_flips": [f / count for f in flips],
                }
            )
            if tops is not None:
                entry["top_fisher"].append({"after_task": k + 1, "mean_abs_mask": [t / count for t in top]})
        entry["accuracy_at_its_end"] = evaluate(ref, stream, after_task=j, tasks=[j])[0]
        entry["accuracy_at_the_end"] = evaluate(final, stream, after_task=last, tasks=[j])[0]
        if j < last:
            entry["swap"] = {}
            for part in PARTS:
                if not parts[part]:
                    continue
                swapped = copy.deepcopy(final)
                sd = swapped.state_dict()
                for n in parts[part]:
                    sd[n] = states[j]["state_dict"][n]
                swapped.load_state_dict(sd)
                entry["swap"][part] = evaluate(swapped, stream, after_task=last, tasks=[j])[0]
        report["tasks"].append(entry)
    report["cosines"] = _cosines(final, inputs)
    # protection=hard: the fraction of each masked layer's weights held after each task (the capacity used)
    held = [s["callbacks"][method.state_key].get("held", {}).get("used") for s in states]
    if all(held):
        report["held"] = [[float(u.float().mean()) for u in used] for used in held]
    return report


def _cosines(final: ContinualClassifier, inputs: list[list[tuple[Tensor, Tensor]]]) -> dict[str, Any]:
    emb_means, mask_means, spreads = [], [], []
    for batches in inputs:
        embs, mask_sum, count = [], None, 0
        for x, t in batches:
            masks, emb = _masks(final, x, t)
            flat = torch.cat([m.flatten(1).sum(0) for m in masks])
            mask_sum = flat if mask_sum is None else mask_sum + flat
            embs.append(emb)
            count += x.shape[0]
        e = torch.cat(embs)
        emb_means.append(e.mean(0))
        assert mask_sum is not None
        mask_means.append(mask_sum / count)
        spreads.append(float((e - e.mean(0)).norm(dim=1).mean()))
    em, mm = torch.stack(emb_means), torch.stack(mask_means)
    cos = lambda a: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T  # noqa: E731
    distance = torch.cdist(em, em)
    off = ~torch.eye(len(em), dtype=torch.bool)
    return {
        "embedding_cosine": cos(em).tolist(),
        "mask_cosine": cos(mm).tolist(),
        "max_embedding_cosine": float(cos(em)[off].max()) if len(em) > 1 else None,
        "max_mask_cosine": float(cos(mm)[off].max()) if len(em) > 1 else None,
        "within_task_spread": sum(spreads) / len(spreads),
        "mean_distance_between_tasks": float(distance[off].mean()) if len(em) > 1 else None,
    }


def render(report: dict[str, Any]) -> str:
    layers = report["layers"]
    lines = [f"{report['run']}: {report['samples']} test inputs a task; masked layers {', '.join(layers)}"]
    for entry in report["tasks"]:
        j = entry["task"]
        at_end, final = 100 * entry["accuracy_at_its_end"], 100 * entry["accuracy_at_the_end"]
        lines.append(f"task {j}: {at_end:.2f} % at its end, {final:.2f} % at the stream's end")
        for m in entry["masks"][1:]:
            change = " ".join(f"{c:.3f}" for c in m["relative_change"])
            flips = " ".join(f"{f:.3f}" for f in m["sign_flips"])
            lines.append(f"  after task {m['after_task']}: mask change {change}; sign flips {flips}")
        if entry["top_fisher"]:
            series = " -> ".join(f"{sum(t['mean_abs_mask']) / len(layers):.3f}" for t in entry["top_fisher"])
            lines.append(f"  |M| on its top-1 % Fisher weights, at its end and after each later task: {series}")
        if "swap" in entry:
            swaps = ", ".join(f"{part} {100 * acc:.2f} %" for part, acc in entry["swap"].items())
            lines.append(f"  the final network with one part from its end: {swaps}")
    if "held" in report:
        series = " -> ".join("/".join(f"{100 * f:.1f}" for f in fractions) for fractions in report["held"])
        lines.append(f"held after each task (% of each masked layer's weights): {series}")
    c = report["cosines"]
    if c["max_embedding_cosine"] is not None:
        lines.append(
            f"at the stream's end: largest cosine between task-mean embeddings {c['max_embedding_cosine']:.4f}, "
            f"task-mean masks {c['max_mask_cosine']:.4f}; embeddings' spread within a task "
            f"{c['within_task_spread']:.3f}, distance between task means {c['mean_distance_between_tasks']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the folder of a finished DWA run (with its checkpoints/)")
    parser.add_argument("--samples", type=int, default=256, help="test inputs per task (default 256)")
    parser.add_argument("--root", default=None, help="the data's folder, if not the run's dataset.root")
    parser.add_argument("--out", type=Path, default=None, help="the report as JSON (default RUN/dwa_diagnostics.json)")
    args = parser.parse_args(argv)
    report = diagnose(args.run, args.samples, args.root)
    print(render(report), flush=True)
    out = args.out or args.run / "dwa_diagnostics.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
