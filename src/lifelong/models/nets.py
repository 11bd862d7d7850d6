"""Plain ``nn.Module`` classifiers: no Lightning, no continual-learning logic, usable anywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """A fully connected classifier: flatten, ``len(hidden_sizes)`` hidden layers with ReLU, a linear head.

    The default (2 x 400) is the network of most permuted-MNIST EWC tables (e.g. Hsu et al., 2018);
    ``hidden_sizes=[1024, 512, 256, 128, 128]`` gives the six-layer MNIST-then-USPS network.

    Args:
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        num_classes: number of outputs.
        hidden_sizes: width of each hidden layer.
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (400, 400),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden_sizes:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, num_classes)


class CNN(nn.Module):
    """Two conv layers (5x5, ReLU, 2x2 max-pool) and a fully connected head.

    The small network of the permuted-MNIST EWC notebooks this project grew from.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of outputs.
        channels: output channels of the two conv layers.
        hidden_size: width of the fully connected hidden layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 256,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(c2 * (h // 4) * (w // 4), hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes)
