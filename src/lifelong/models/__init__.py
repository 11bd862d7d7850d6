"""Networks (plain ``nn.Module``) and the LightningModule that trains them through a stream."""

from lifelong.models.module import ContinualClassifier
from lifelong.models.nets import CNN, MLP, AlexNet, ReducedResNet18

__all__ = ["CNN", "MLP", "AlexNet", "ContinualClassifier", "ReducedResNet18"]
