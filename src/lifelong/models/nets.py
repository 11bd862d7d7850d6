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
        init: ``"default"`` (PyTorch's ``nn.Linear`` initialisation) or ``"xavier"`` (Xavier-uniform weights and
            zero biases, as the official DER code's MNIST network).
        norm: ``"none"`` or ``"batch"``: batch normalisation after each hidden layer's linear map (GDumb's MNIST
            network).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (400, 400),
        dropout: float = 0.0,
        init: str = "default",
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"model.norm must be 'none' or 'batch', got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        if init not in ("default", "xavier"):
            raise ValueError(f"model.init must be 'default' or 'xavier', got {init!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden_sizes:
            layers += [nn.Linear(width, int(h)), *([nn.BatchNorm1d(int(h))] if norm == "batch" else []), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        if init == "xavier":
            for m in self.layers:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

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


class AlexNet(nn.Module):
    """The small AlexNet-style network of the HAT experiments (Serra et al., 2018).

    Three conv layers (kernels ``size // 8``, ``size // 10`` and 2; ReLU; 2x2 max-pool), dropout, two fully
    connected layers and a linear output. With the defaults and 32 x 32 inputs: 64, 128, 256 channels and
    2 x 2048 hidden units, about 6.5 M parameters.

    Args:
        input_shape: ``(C, H, W)`` of one input (square images).
        num_classes: number of outputs.
        channels: output channels of the three conv layers.
        hidden_size: width of the two fully connected layers.
        dropout: probabilities after the conv layers and after the fully connected ones.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (64, 128, 256),
        hidden_size: int = 2048,
        dropout: Sequence[float] = (0.2, 0.5),
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h != w or h < 16:
            raise ValueError(f"model=alexnet needs square images of at least 16 x 16, got {h} x {w}")
        p_conv, p_fc = dropout
        size = h
        layers: list[nn.Module] = []
        width = c
        for out, k in zip(channels, (size // 8, size // 10, 2), strict=True):
            k = max(k, 1)
            layers += [nn.Conv2d(width, out, kernel_size=k), nn.ReLU(), nn.Dropout(p_conv), nn.MaxPool2d(2)]
            size = (size - k + 1) // 2
            width = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(width * size * size, hidden_size),
            nn.ReLU(),
            nn.Dropout(p_fc),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(p_fc),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """The reduced ResNet-18 of GEM (Lopez-Paz & Ranzato, 2017), common on split CIFAR.

    A 3x3 stem and four stages of two BasicBlocks with ``width``, 2, 4 and 8 x ``width`` channels (strides 1,
    2, 2, 2), global average pooling and a linear output; about 1.1 M parameters at ``width=20``.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of outputs.
        width: channels of the first stage (64 gives the full-width ResNet-18 body).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 20) -> None:
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            blocks += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))  # (B, num_classes)
