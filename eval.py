"""Evaluate a checkpoint on every task of its stream: ``python eval.py ckpt_path=RUN/checkpoints/task_3.ckpt``.

The checkpoint carries the run's config; the stream is rebuilt from it and checked against the one recorded
in the checkpoint (permutations, class orders, angles), so the test sets and heads are the run's own.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lifelong import evaluate
from lifelong.checkpoints import read_checkpoint
from lifelong.cli import build, exit_with
from lifelong.errors import LifelongError, WriteError
from lifelong.files import write_atomic
from lifelong.logs import quiet_lightning


def _load(path: str) -> dict[str, Any]:
    try:
        ckpt = read_checkpoint(path)
    except LifelongError as err:
        exit_with(str(err))
    if "config" not in ckpt.get("lifelong", {}).get("info", {}):
        exit_with(f"{path} holds no lifelong config: it was not written by train.py (or by an older version of it)")
    return ckpt


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    ckpt = _load(cfg.ckpt_path)
    info = ckpt["lifelong"]["info"]
    run_cfg = OmegaConf.create(info["config"])
    if cfg.root is not None:
        with open_dict(run_cfg):
            run_cfg.dataset.root = cfg.root
    try:
        stream, module, _ = build(run_cfg)
        stream.check_state(ckpt.get(type(stream).__qualname__, {}))  # refuses another stream
        module.load_state_dict(ckpt["state_dict"])
    except (LifelongError, RuntimeError) as err:
        exit_with(str(err))
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
        try:
            write_atomic(cfg.out, json.dumps(result, indent=2) + "\n")
        except WriteError as err:  # a full disk, a read-only folder: the result above is printed already
            exit_with(str(err))


if __name__ == "__main__":
    sys.exit(main())
