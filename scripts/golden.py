"""Golden results: one short real run per method, recorded, so that a structural change can show it changed no
number (DEVELOPERS.md: "record golden results first").

    python scripts/golden.py record     # run every case and write tests/golden/metrics.json
    python scripts/golden.py check      # run every case again and compare, matrix for matrix (exit 1 if any differ)
    python scripts/golden.py check ewc  # only the cases named

Every ``conf/method/*.yaml`` has a case (and EWC with a replay memory beside it, and EWC on permuted MNIST, its
home stream), each on the stream its tests use: split MNIST, 3 tasks, 2,000 training and 300 test images per
task, seed 0, the task scenario, or the class scenario for the replay methods. Each case is ``python train.py``
as a user runs it; the record keeps each run's accuracy matrices (test, validation, task-aware where the
scenario has one), its initial accuracies, and a digest of its final weights. The matrices must be identical;
weights that differ with the same matrices (a sum taken in another order) are reported, not failed. A change
of number is a change of behaviour: a commit that changes one says which, and why, and records the file again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "tests" / "golden" / "metrics.json"
# 2,000 training images a task: with fewer (600 gave 4 steps a task), EWC's numbers were fine-tuning's to the digit
SPLIT = ["dataset=split_mnist", "dataset.num_tasks=3", "dataset.max_train_samples=2000", "dataset.max_test_samples=300"]
CLASS = [*SPLIT, "dataset.scenario=class"]
CASES: dict[str, list[str]] = {
    **{m: [f"method={m}", *SPLIT] for m in ("finetune", "joint", "ewc", "online_ewc", "l2", "si", "mas", "lwf")},
    **{m: [f"method={m}", *SPLIT] for m in ("hat", "dwa", "dwa_paper")},
    **{m: [f"method={m}", *CLASS] for m in ("er", "der", "derpp", "agem", "icarl")},
    "ewc+reservoir": ["method=ewc", "replay=reservoir", *CLASS],
    "ewc permuted_mnist": [
        "method=ewc",
        "dataset=permuted_mnist",
        "dataset.num_tasks=3",
        "dataset.max_train_samples=1000",
    ],
}
COMMON = ["seed=0", "logger=none", "trainer.enable_progress_bar=false"]
KEPT = (
    "accuracy_matrix",
    "val_accuracy_matrix",
    "task_aware_accuracy_matrix",
    "val_task_aware_accuracy_matrix",
    "initial_accuracy",
    "val_initial_accuracy",
)


def run_case(name: str, folder: Path) -> dict:
    """``python train.py`` for case ``name``; the kept entries of its metrics.json."""
    run_dir = folder / name.replace(" ", "_").replace("+", "_")
    data = [f"dataset.root={os.environ['LIFELONG_DATA_DIR']}"] if os.environ.get("LIFELONG_DATA_DIR") else []
    cmd = [sys.executable, str(REPO / "train.py"), *CASES[name], *COMMON, *data, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: train.py exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**{k: metrics[k] for k in KEPT if k in metrics}, "weights_sha1": _weights_digest(run_dir)}


def _weights_digest(run_dir: Path) -> str:
    """SHA-1 of the network's final parameters and buffers, bit for bit (the last checkpoint's state_dict)."""
    import hashlib

    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("cases", nargs="*", help=f"default: all ({', '.join(CASES)})")
    args = parser.parse_args(argv)
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; the cases: {', '.join(CASES)}")
    recorded = json.loads(RECORD.read_text())["cases"] if RECORD.is_file() else {}
    differ = []
    with tempfile.TemporaryDirectory(prefix="lifelong-golden-") as tmp:
        for name in names:
            got = run_case(name, Path(tmp))
            if args.mode == "record":
                recorded[name] = {"overrides": [*CASES[name], *COMMON], **got}
                print(f"recorded {name}: last row {got['accuracy_matrix'][-1]}", flush=True)
                continue
            want = {k: v for k, v in recorded.get(name, {}).items() if k != "overrides"}
            weights = got.pop("weights_sha1") == want.pop("weights_sha1", None)
            same = got == want
            note = "" if weights or not same else " (the same matrices; the final weights differ in their bits)"
            print(f"{'same' if same else 'DIFFERS'}: {name}{note}", flush=True)
            if not same:
                differ.append(name)
                for key in sorted(set(got) | set(want)):
                    if got.get(key) != want.get(key):
                        print(f"  {key}: recorded {want.get(key)}\n  {' ' * len(key)}  now      {got.get(key)}")
    if args.mode == "record":
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "made_by": "python scripts/golden.py record (LIFELONG_DATA_DIR pointing at MNIST)",
            "torch": __import__("torch").__version__,
            "cases": dict(sorted(recorded.items())),
        }
        RECORD.write_text(json.dumps(header, indent=1) + "\n")
        print(f"written: {RECORD}")
        return 0
    print(f"{len(names) - len(differ)} of {len(names)} cases as recorded" + (f"; differ: {differ}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
