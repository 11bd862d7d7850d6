"""Continual-learning methods, each a Lightning Callback."""

from lifelong.methods.agem import AGEM
from lifelong.methods.base import ContinualMethod
from lifelong.methods.der import DarkExperienceReplay
from lifelong.methods.dwa import DWA, DWANet
from lifelong.methods.er_ace import ERACE
from lifelong.methods.ewc import EWC
from lifelong.methods.finetune import Finetune
from lifelong.methods.fisher import FisherSums, fisher_sums, per_sample_loop_fisher
from lifelong.methods.gdumb import GDumb
from lifelong.methods.hat import HAT, HATNet
from lifelong.methods.icarl import ICaRL
from lifelong.methods.joint import Joint
from lifelong.methods.l2 import L2
from lifelong.methods.lwf import LwF
from lifelong.methods.mas import MAS, mas_sums, per_sample_loop_mas
from lifelong.methods.quadratic import QuadraticRegularizer
from lifelong.methods.replay import ExperienceReplay, ReplayBuffer
from lifelong.methods.si import SI

__all__ = [
    "AGEM",
    "DWA",
    "ERACE",
    "EWC",
    "HAT",
    "L2",
    "MAS",
    "SI",
    "ContinualMethod",
    "DWANet",
    "DarkExperienceReplay",
    "ExperienceReplay",
    "Finetune",
    "FisherSums",
    "GDumb",
    "HATNet",
    "ICaRL",
    "Joint",
    "LwF",
    "QuadraticRegularizer",
    "ReplayBuffer",
    "fisher_sums",
    "mas_sums",
    "per_sample_loop_fisher",
    "per_sample_loop_mas",
]
