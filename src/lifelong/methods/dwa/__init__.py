"""Dynamic weight allocation (DWA): per-sample weight masks generated from a context embedding of the input.

* [`layers`][lifelong.methods.dwa.layers]: the masked Linear and Conv2d layers;
* [`net`][lifelong.methods.dwa.net]: `DWANet`, the wrapped network with its context processor;
* [`curriculum`][lifelong.methods.dwa.curriculum]: each sample's complexity, and the curriculum built on it;
* [`held`][lifelong.methods.dwa.held]: `HeldMasks`, lifelong's hard protection of a finished task's masks;
* [`options`][lifelong.methods.dwa.options]: the options' checks, and `PAPER_OPTIONS` (the paper's DWA);
* [`method`][lifelong.methods.dwa.method]: `DWA`, the method (a
  [`ContinualMethod`][lifelong.methods.base.ContinualMethod]).
"""

from lifelong.methods.dwa.curriculum import Curriculum
from lifelong.methods.dwa.held import HeldMasks
from lifelong.methods.dwa.layers import GATES, MaskedConv2d, MaskedLinear, PerTask, factor_pair, triplet
from lifelong.methods.dwa.method import DWA
from lifelong.methods.dwa.net import ContextProcessor, DWANet
from lifelong.methods.dwa.options import PAPER_OPTIONS

__all__ = [
    "DWA",
    "GATES",
    "PAPER_OPTIONS",
    "ContextProcessor",
    "Curriculum",
    "DWANet",
    "HeldMasks",
    "MaskedConv2d",
    "MaskedLinear",
    "PerTask",
    "factor_pair",
    "triplet",
]
