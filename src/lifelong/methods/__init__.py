"""Continual-learning methods, each a Lightning Callback."""

from lifelong.methods.base import ContinualMethod
from lifelong.methods.ewc import EWC
from lifelong.methods.finetune import Finetune
from lifelong.methods.fisher import FisherSums, fisher_sums, per_sample_loop_fisher
from lifelong.methods.joint import Joint

__all__ = [
    "EWC",
    "ContinualMethod",
    "Finetune",
    "FisherSums",
    "Joint",
    "fisher_sums",
    "per_sample_loop_fisher",
]
