"""Dynamic weight allocation (DWA): per-sample weight masks generated from a context embedding of the input.

* [`layers`][lifelong.methods.dwa.layers]: the masked Linear and Conv2d layers;
* [`net`][lifelong.methods.dwa.net]: `DWANet`, the wrapped network with its context processor;
* [`curriculum`][lifelong.methods.dwa.curriculum]: each sample's complexity, and the curriculum built on it;
* [`method`][lifelong.methods.dwa.method]: `DWA`, the method (a
  [`ContinualMethod`][lifelong.methods.base.ContinualMethod]).
"""

from lifelong.methods.dwa.curriculum import Curriculum
from lifelong.methods.dwa.layers import GATES, MaskedConv2d, MaskedLinear, factor_pair, triplet
from lifelong.methods.dwa.method import DWA
from lifelong.methods.dwa.net import ContextProcessor, DWANet

__all__ = [
    "DWA",
    "GATES",
    "ContextProcessor",
    "Curriculum",
    "DWANet",
    "MaskedConv2d",
    "MaskedLinear",
    "factor_pair",
    "triplet",
]
