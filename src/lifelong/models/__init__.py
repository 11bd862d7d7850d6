"""Networks (plain ``nn.Module``) and the LightningModule that trains them through a stream."""

from lifelong.models.module import ContinualClassifier
from lifelong.models.nets import CNN, MLP

__all__ = ["CNN", "MLP", "ContinualClassifier"]
