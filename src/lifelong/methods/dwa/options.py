"""DWA's options, checked before anything is built: each bad value named with what it must be."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lifelong.methods.dwa.layers import check_sparsity

# Every option of `DWA` at the paper's value (conf/method/dwa_paper.yaml holds the same; a test checks it):
# the paper-faithful DWA is DWA(**PAPER_OPTIONS); DWA()'s defaults are lifelong's held-mask extension.
PAPER_OPTIONS: dict[str, Any] = {
    "stem_layers": 1,
    "emb_size": 100,
    "processor_features": [32, 128],
    "gate": "tanh",
    "lambda_emb": 20.0,
    "lambda_attention": 0.1,
    "lambda_sparsity": 500.0,
    "sparsity": "paper",
    "sparsity_target": 0.2,
    "margin": 1.5,
    "delta": 1.0,
    "anchor_first_task": False,
    "anchor_threshold": 0.4,
    "anchor_samples": 320,
    "negative_searches": 5,
    "curriculum": True,
    "curriculum_start": 0.2,
    "curriculum_epochs": 100,
    "warmup_epochs": 0,
    "warmup_divisor": 750.0,
    "fisher_samples": None,
    "chunk_elements": 16777216,
    "paper_init": True,
    "mask_form": "full",
    "context": "shared",
    "protection": "soft",
    "s_max": 400.0,
}


def check_options(v: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first of `DWA`'s arguments ``v`` (by name) out of its range."""
    for key, value in (
        ("lambda_emb", v["lambda_emb"]),
        ("lambda_attention", v["lambda_attention"]),
        ("lambda_sparsity", v["lambda_sparsity"]),
        ("margin", v["margin"]),
        ("delta", v["delta"]),
    ):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"method.{key} must be >= 0, got {value}")
    check_sparsity(v["sparsity"])
    for key, value in (("sparsity_target", v["sparsity_target"]), ("anchor_threshold", v["anchor_threshold"])):
        if not 0 <= value <= 1:
            raise ValueError(f"method.{key} must be in [0, 1], got {value}")
    if not 0 <= v["curriculum_start"] <= 1:
        raise ValueError(f"method.curriculum_start must be in [0, 1], got {v['curriculum_start']}")
    for key, count in (
        ("emb_size", v["emb_size"]),
        ("anchor_samples", v["anchor_samples"]),
        ("negative_searches", v["negative_searches"]),
        ("curriculum_epochs", v["curriculum_epochs"]),
        ("chunk_elements", v["chunk_elements"]),
    ):
        if int(count) < 1:
            raise ValueError(f"method.{key} must be at least 1, got {count}")
    if len(v["processor_features"]) != 2 or min(int(f) for f in v["processor_features"]) < 1:
        raise ValueError(f"method.processor_features must be two widths [F_B, F_E], got {v['processor_features']}")
    if int(v["warmup_epochs"]) < 0 or not v["warmup_divisor"] >= 1:
        raise ValueError(
            f"method.warmup_epochs must be >= 0 and method.warmup_divisor >= 1, got {v['warmup_epochs']}, "
            f"{v['warmup_divisor']}"
        )
    if v["fisher_samples"] is not None and v["fisher_samples"] < 1:
        raise ValueError(f"method.fisher_samples must be a positive number or null, got {v['fisher_samples']}")
