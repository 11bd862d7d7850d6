"""logger=wandb and logger=mlflow: each run is read back with the tracker's own client library and must hold
the accuracy matrix that metrics.json holds, the run's config, and the summary metrics."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifelong.loggers import wandb_offline
from tests.conftest import read_metrics, run_train

SMALL = ["dataset.num_tasks=2", "dataset.max_train_samples=8000"]


def _no_wandb_account(home: Path) -> dict[str, str]:
    """An environment with no W&B key and no W&B mode: what a user who never ran ``wandb login`` has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(home)}


def wandb_records(path: Path) -> Iterator:
    """The records of a ``.wandb`` file, parsed with W&B's protobuf ``Record``.

    W&B's own Python reader of these files went with its Go core; the container is LevelDB's log format
    (32 KiB blocks of records, each with a 7-byte header: checksum, length, type full/first/middle/last) after
    a 7-byte file header ``:W&B``, magic 0xBEE1, version 0.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, or the last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _matrix(rows: list[dict], num_tasks: int) -> list[float]:
    """The accuracy matrix, row after row, from logged rows holding ``task`` and ``test/acc/task_<j>``."""
    by_task = {int(r["task"]): r for r in rows if "task" in r and "test/acc/task_1" in r}
    return [by_task[i][f"test/acc/task_{j}"] for i in range(1, num_tasks + 1) for j in range(1, num_tasks + 1)]


def _flat(matrix: list[list[float]]) -> list[float]:
    return [v for row in matrix for v in row]


@pytest.mark.integration
def test_wandb_offline_run_holds_the_accuracy_matrix(tmp_path, mnist_root):
    env = _no_wandb_account(tmp_path / "home")
    proc = run_train([f"dataset.root={mnist_root}", *SMALL, "logger=wandb"], tmp_path / "run", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")  # offline: no account
    assert f"wandb sync {run_file.parent}" in proc.stdout + proc.stderr

    history, config, summary = [], {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            assert record.run.display_name == "ewc-permuted_mnist-seed0"
    assert _matrix(history, 2) == pytest.approx(_flat(m["accuracy_matrix"]), abs=1e-6)
    assert config["config"]["dataset"]["num_tasks"] == 2
    assert config["run"]["method"] == "ewc"
    final = {k: v for row in history for k, v in row.items()}
    assert final["test/avg_accuracy"] == pytest.approx(m["avg_accuracy"], abs=1e-6)
    assert final["val/avg_accuracy"] == pytest.approx(m["val_avg_accuracy"], abs=1e-6)
    for figure in ("accuracy_matrix", "accuracy_curves"):  # as W&B images, their files in the run
        assert final[f"{figure}/_type"] == "images/separated"
        assert all((run_file.parent / "files" / name).is_file() for name in final[f"{figure}/filenames"])


@pytest.mark.integration
def test_mlflow_run_holds_the_accuracy_matrix(tmp_path, mnist_root):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [f"dataset.root={mnist_root}", *SMALL, "logger=mlflow", f"logger.store={store}"]
    proc = run_train(args, tmp_path / "run", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lifelong").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "ewc-permuted_mnist-seed0"
    rows: dict[int, dict] = {}
    for key in ["task", *(f"test/acc/task_{j}" for j in (1, 2))]:
        for point in client.get_metric_history(run.info.run_id, key):
            rows.setdefault(point.step, {})[key] = point.value
    assert _matrix(list(rows.values()), 2) == pytest.approx(_flat(m["accuracy_matrix"]), abs=1e-6)
    assert run.data.params["config/dataset/num_tasks"] == "2"
    assert run.data.params["run/method"] == "ewc"
    assert run.data.metrics["test/avg_accuracy"] == pytest.approx(m["avg_accuracy"], abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curves.png"} <= artifacts
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))).read_text())
    assert logged == m


def test_wandb_stays_offline_without_an_account(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert not wandb_offline()  # logged in with `wandb login`
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_offline()  # W&B's own setting decides


@pytest.mark.parametrize(("logger", "module"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_tracker_not_installed_is_named_with_its_extra(tmp_path, monkeypatch, logger, module):
    import importlib.util

    from lifelong.errors import ConfigError
    from lifelong.loggers import MLflowStreamLogger, WandbStreamLogger

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=rf"logger={logger} needs the {module} package.*lifelong\[{logger}\]"):
        if logger == "wandb":
            WandbStreamLogger(save_dir=str(tmp_path))
        else:
            MLflowStreamLogger(store=str(tmp_path / "mlruns"))
