"""Evaluate a checkpoint on every task of its stream: ``python eval.py ckpt_path=RUN/checkpoints/task_3.ckpt``.

The checkpoint carries the run's config; the stream is rebuilt from it and checked against the one recorded
in the checkpoint (permutations, class orders, angles), so the test sets and heads are the run's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from lifelong import evaluate
from lifelong.errors import LifelongError
from train import _fail, _fail_on, build


def _load(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        _fail(f"ckpt_path={path} is not a file. Point it at a checkpoint, e.g. RUN/checkpoints/last.ckpt")
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: pickle, zip and torch errors differ
        _fail(f"{path} could not be read as a checkpoint ({type(err).__name__}: {err})")
        raise AssertionError("unreachable") from err
    if "config" not in ckpt.get("lifelong", {}).get("info", {}):
        _fail(f"{path} holds no lifelong config: it was not written by train.py (or by an older version of it)")
    return ckpt


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    ckpt = _load(cfg.ckpt_path)
    info = ckpt["lifelong"]["info"]
    run_cfg = OmegaConf.create(info["config"])
    if cfg.root is not None:
        with open_dict(run_cfg):
            run_cfg.dataset.root = cfg.root
    try:
        stream, module, _ = build(run_cfg)
        stream.load_state_dict(ckpt.get(type(stream).__qualname__, {}))  # refuses another stream
        module.load_state_dict(ckpt["state_dict"])
    except (LifelongError, ValueError, TypeError, InstantiationException, RuntimeError) as err:
        _fail_on(err)
        return
    task = stream.task_of_epoch(int(ckpt["epoch"]))
    row = evaluate(module.to(cfg.device), stream, after_task=task)
    recorded = module.accuracy_matrix[task].tolist()
    lines = [
        f"{cfg.ckpt_path}: {info.get('method')} on {info.get('dataset')} ({stream.scenario} scenario), "
        f"seed {info.get('seed')}, trained through task {task + 1} of {stream.num_tasks}"
    ]
    lines += [f"  task {j + 1:>2}: {100 * acc:6.2f} %" for j, acc in enumerate(row)]
    lines.append(f"  average over the tasks trained: {100 * sum(row[: task + 1]) / (task + 1):.2f} %")
    same = [round(a, 6) for a in row] == [round(a, 6) for a in recorded]
    lines.append("  (the same as the row recorded during training)" if same else f"  recorded in training: {recorded}")
    print("\n".join(lines), flush=True)
    if cfg.out:
        result = {
            "ckpt_path": str(cfg.ckpt_path),
            "after_task": task + 1,
            "accuracy": row,
            "recorded": recorded,
            "method": info.get("method"),
            "dataset": info.get("dataset"),
            "scenario": stream.scenario,
            "seed": info.get("seed"),
        }
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
