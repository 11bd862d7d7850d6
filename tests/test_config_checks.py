"""The config checker's rules on plain values, and the helpers that keep a refused run from changing files."""

from __future__ import annotations

import logging
from typing import Literal

import pytest

from lifelong.cli import held_file_logs
from lifelong.config import check_targets, conforms, describe, name_the_key
from lifelong.errors import ConfigError
from lifelong.files import write_atomic


class Part:
    def __init__(
        self,
        n: int,
        rate: float = 0.1,
        mode: Literal["a", "b"] = "a",
        sizes: tuple[int, int] = (1, 2),
        limit: int | None = None,
        flag: bool = False,
    ) -> None:
        pass


class Child(Part):
    def __init__(self, extra: str = "", **kwargs) -> None:
        super().__init__(**kwargs)


TARGET = f"{__name__}.Part"


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (3, int, True),
        (True, int, False),  # YAML's true is not a number of tasks
        (3.0, int, False),
        (3, float, True),  # an integer stands for a float
        ("3", float, False),
        ([1, 2], tuple[int, int], True),  # a list stands for a tuple
        ([1, 2, 3], tuple[int, int], False),
        ([1, "x"], list[int], False),
        (None, int | None, True),
        ("b", Literal["a", "b"], True),
        ("c", Literal["a", "b"], False),
        ("abc", float | type(pytest), False),  # a class YAML cannot write is not an alternative to a number
        ("cuda", type(pytest), True),  # ... but alone it is left to the constructor
        ({"k": 1}, dict[str, int], True),
    ],
)
def test_conforms(value, hint, ok):
    assert conforms(value, hint) is ok


def test_describe_speaks_config():
    assert describe(int | None) == "an integer or null"
    assert describe(list[int]) == "a list of integers"
    assert describe(Literal["a", "b"]) == "one of 'a', 'b'"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"n": "abc"}, "part.n='abc': expected an integer, got a string"),
        ({"n": 1, "mode": "c"}, "part.mode='c': expected one of 'a', 'b'"),
        ({"n": 1, "sizes": [1]}, "part.sizes=[1]: expected a list of 2"),
        ({"n": 1, "limit": True}, "part.limit=true: expected an integer or null"),
        ({"n": 1, "typo": 1}, "part.typo is not an option of tests.test_config_checks.Part; its options: n, rate"),
    ],
)
def test_check_targets_names_the_key(node, message):
    with pytest.raises(ConfigError) as err:
        check_targets({"part": {"_target_": TARGET, **node}})
    assert message in str(err.value)


def test_check_targets_follows_kwargs_to_the_base_and_into_nested_nodes():
    child = {"_target_": f"{__name__}.Child", "extra": "x", "n": 2, "rate": 1}
    check_targets({"part": child})
    with pytest.raises(ConfigError, match=r"outer\.extra\.n='x'"):  # a nested node is checked on its own
        check_targets({"outer": {"_target_": f"{__name__}.Child", "extra": {"_target_": TARGET, "n": "x"}}})
    with pytest.raises(ConfigError, match="cannot be imported"):
        check_targets({"part": {"_target_": "tests.nowhere.Part"}})


def test_name_the_key():
    node = {"lr": -0.1, "momentum": 0.5, "fisher_type": "x"}
    assert name_the_key("Invalid learning rate: -0.1", "optimizer", node) == (
        "optimizer.lr=-0.1: Invalid learning rate: -0.1"
    )
    assert name_the_key("fisher_type must be one of", "method", node) == "method.fisher_type must be one of"
    assert name_the_key("method.decay must be in [0, 1]", "method", node) == "method.decay must be in [0, 1]"
    assert name_the_key("something else", "method", node) == "method: something else"


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")

    class Unwritable:
        def __str__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(TypeError):
        write_atomic(path, Unwritable())  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_held_file_logs_are_written_on_success_and_dropped_on_failure(tmp_path):
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log", delay=True)
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with pytest.raises(SystemExit), held_file_logs():
            logging.getLogger("x").info("refused")
            raise SystemExit(2)
        assert not (tmp_path / "train.log").exists()
        with held_file_logs():
            logging.getLogger("x").info("accepted")
        handler.flush()
        assert (tmp_path / "train.log").read_text() == "accepted\n"
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
