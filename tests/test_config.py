"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from lifelong.data import TaskStream
from lifelong.methods import ContinualMethod

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["dataset", "model", "optimizer", "method", "trainer", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
NEEDS_GPU = {"gpu", "ddp"}


def _compose(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(tmp_path, monkeypatch, group, option):
    monkeypatch.chdir(tmp_path)  # logger=mlflow opens its local store, mlruns/, in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _compose(tmp_path, [f"{group}={option}"])
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, TaskStream)
    net = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    opt = instantiate(cfg.optimizer)(net.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(instantiate(cfg.method), ContinualMethod)
    if cfg.get("logger"):
        instantiate(cfg.logger)
        if option == "mlflow":
            assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    trainer = instantiate(cfg.trainer)
    if option not in NEEDS_GPU or torch.cuda.is_available():
        assert isinstance(trainer(logger=False, max_epochs=1), L.Trainer)


def test_top_level_keys_reach_the_parts(tmp_path):
    cfg = _compose(tmp_path, ["seed=7", "epochs_per_task=3", "method=online_ewc", "method.ewc_lambda=5"])
    dm = instantiate(cfg.dataset)
    assert (dm.seed, dm.epochs_per_task) == (7, 3)
    ewc = instantiate(cfg.method)
    assert (ewc.mode, ewc.ewc_lambda) == ("online", 5.0)


@pytest.mark.parametrize("option", [p.stem for p in sorted((CONF / "replay").glob("*.yaml"))])
def test_replay_composes_beside_a_method(tmp_path, option):
    cfg = _compose(tmp_path, ["method=ewc", f"replay={option}"])
    replay = instantiate(cfg.replay)
    assert isinstance(replay, ContinualMethod) and replay.buffer.policy == option


EXPERIMENTS = [p.stem for p in sorted((CONF / "experiment").glob("*.yaml"))]


def test_a_preset_pins_the_strength_of_the_method_chosen(tmp_path):
    ewc = _compose(tmp_path, ["experiment=permuted_mnist_10", "method=ewc"])
    assert instantiate(ewc.method).ewc_lambda == 500  # selected on validation data (the preset's header)
    assert instantiate(_compose(tmp_path, ["method=ewc"]).method).ewc_lambda == 60  # no preset: the default
    finetune = _compose(tmp_path, ["experiment=permuted_mnist_10", "method=finetune"])
    assert "ewc_lambda" not in finetune.method  # other methods ignore it
    # a preset may pin one per Fisher structure and mode (each selected on validation data)
    ritter = ["experiment=ritter2018_permuted_mnist_50"]
    for overrides, selected in (
        (["method=ewc"], 30),
        (["method=online_ewc"], 30),
        (["method=online_ewc", "method.fisher_structure=kfac"], 10),
        (["method=ewc", "method.ewc_lambda=7"], 7),
    ):
        assert instantiate(_compose(tmp_path, [*ritter, *overrides]).method).ewc_lambda == selected, overrides
    assert "ewc_lambda" not in _compose(tmp_path, [*ritter, "method=finetune"]).method


@pytest.mark.parametrize("option", EXPERIMENTS)
def test_experiment_presets_pin_their_protocol(tmp_path, option):
    assert len(EXPERIMENTS) >= 4
    cfg = _compose(tmp_path, [f"experiment={option}", "method=ewc", "method.ewc_lambda=200"])
    dm = instantiate(cfg.dataset)
    assert instantiate(cfg.method).ewc_lambda == 200  # presets leave the method to the command line
    assert cfg.reset_optimizer
    if option == "dwa_mixture":  # the DWA paper's protocol: SGD at 0.075, batch 32, 200 epochs per task
        assert (cfg.optimizer.lr, dm.batch_size, dm.epochs_per_task) == (0.075, 32, 200)
        assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0
        return
    if option.startswith("der2020"):  # Buzzega et al.'s MNIST protocol: MLP 100-100, plain SGD, 1 epoch, [0, 1]
        assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0
        assert list(cfg.model.hidden_sizes) == [100, 100] and cfg.model.init == "xavier"
        assert dm.epochs_per_task == 1 and dm.standardize is False and dm.val_fraction == 0
        expected = (5, "class", 10) if option.endswith("seq_mnist") else (20, "domain", 128)
        assert (dm.num_tasks, dm.scenario, dm.batch_size) == expected
        assert cfg.class_outputs == ("all" if option.endswith("seq_mnist") else "seen")  # the official head
        return
    assert cfg.optimizer.lr in (0.001, 0.0001) and dm.batch_size == 128
    if option.startswith("hsu2018"):
        assert (dm.num_tasks, dm.scenario, dm.epochs_per_task) == (5, option.rsplit("_", 1)[1], 4)
        assert list(cfg.model.hidden_sizes) == [400, 400]
    elif option.startswith("dwa_"):
        assert dm.scenario == "task" and dm.epochs_per_task == 1
    elif option.startswith("ritter2018"):  # 50 permuted tasks of one epoch, MLP 2 x 400, pixels in [0, 1]
        assert (dm.num_tasks, dm.scenario, dm.epochs_per_task) == (50, "domain", 1)
        assert list(cfg.model.hidden_sizes) == [400, 400] and dm.standardize is False and dm.val_fraction == 0.1
    else:
        assert (dm.num_tasks, dm.scenario) == (10, "domain") and list(cfg.model.hidden_sizes) == [1000, 1000]
        assert dm.standardize is False  # pixels in [0, 1], as in the paper (see the preset's comment)
