"""Whole-batch image transforms: standardisation, permutations, rotations, crops and flips on the device.

Every transform takes a uint8 batch ``(B, C, H, W)`` and each sample's task, and applies per-task parameters
by indexing, so a batch of several tasks (the joint baseline, replay) costs the same as a batch of one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def channel_mean_std(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images ``(N, C, H, W)``, in [0, 1] units.

    Computed from each channel's histogram, so no float copy of the images is made.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].flatten(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / (counts.sum() - 1).clamp_min(1)
        means.append(mean)
        stds.append(var.sqrt().clamp_min(1e-6))
    return torch.stack(means).float(), torch.stack(stds).float()


def resize_images(images: Tensor, size: Sequence[int], channels: int, chunk: int = 4096) -> Tensor:
    """uint8 images ``(N, C, H, W)`` resized (bilinear, antialiased) to ``size`` with ``channels`` channels.

    Grey images are repeated to three channels; colour images become grey with ITU-R 601 luma weights (as
    PIL's ``convert("L")``). Done once when a stream is built, in chunks to bound memory.
    """
    n, c, h, w = images.shape
    size = (int(size[0]), int(size[1]))
    if (c, h, w) == (channels, *size):
        return images
    if channels not in (1, 3):
        raise ValueError(f"images can be given 1 or 3 channels, not {channels}")
    out = torch.empty((n, channels, *size), dtype=torch.uint8)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].float()
        if c == 3 and channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)  # (grey to colour: broadcast)
    return out


class ImagePipeline:
    """uint8 batch -> standardised float batch, with an optional per-task pixel permutation or rotation.

    Args:
        mean: ``(T, C)`` per-task, per-channel mean in [0, 1] units (rows may repeat).
        std: ``(T, C)`` the same for the standard deviation.
        perms: ``(T, H*W)`` a pixel permutation per task (permuted streams), or ``None``.
        angles: ``(T,)`` a rotation in degrees per task (rotated streams), or ``None``. Pixels rotated in
            from outside the image are black (0 before standardisation).
        image_size: ``(H, W)``, needed for ``angles``.
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor,
        perms: Tensor | None = None,
        angles: Tensor | None = None,
        image_size: Sequence[int] | None = None,
    ) -> None:
        self.scale = 1.0 / (255.0 * std)  # x * scale - shift == (x / 255 - mean) / std
        self.shift = mean / std
        self.perms = perms
        self.grids: Tensor | None = None
        if angles is not None:
            if image_size is None:
                raise ValueError("a rotation needs the image size")
            self.grids = _rotation_grids(angles, int(image_size[0]), int(image_size[1]))

    def to(self, device: torch.device) -> ImagePipeline:
        for name in ("scale", "shift", "perms", "grids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def __call__(self, images: Tensor, tasks: Tensor, task: int | None) -> Tensor:
        out = self.pixels(images, tasks, task)
        b, c = out.shape[:2]
        if task is not None:
            scale, shift = self.scale[task].view(1, c, 1, 1), self.shift[task].view(1, c, 1, 1)
        else:
            scale, shift = self.scale[tasks].view(b, c, 1, 1), self.shift[tasks].view(b, c, 1, 1)
        return out.mul_(scale).sub_(shift)

    def pixels(self, images: Tensor, tasks: Tensor, task: int | None) -> Tensor:
        """What the network sees before standardisation: the permuted or rotated images, floats in [0, 255]."""
        b, c, h, w = images.shape
        if self.perms is not None:  # permute the uint8 pixels (a quarter of the bytes of floats), then scale
            x = images.reshape(b, c, h * w)
            if task is not None:
                x = x.index_select(2, self.perms[task])
            else:  # several tasks in one batch: one permutation per sample
                x = x.gather(2, self.perms[tasks].unsqueeze(1).expand(b, c, h * w))
            out = x.float().view(b, c, h, w)
        else:
            out = images.float()
        if self.grids is not None:
            grid = self.grids[task].expand(b, -1, -1, -1) if task is not None else self.grids[tasks]
            out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out


def _rotation_grids(angles: Tensor, h: int, w: int) -> Tensor:
    """``(T, H, W, 2)`` sampling grids that rotate an image by each angle (degrees, counter-clockwise)."""
    rad = angles.double() * math.pi / 180
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(rad)
    # grid coordinates are (x right, y down): output pixel p samples the input at R p, which turns the image
    # counter-clockwise as displayed (torchvision's convention; 90 degrees is torch.rot90(k=1))
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (T, 2, 3)
    return F.affine_grid(theta.float(), [len(angles), 1, h, w], align_corners=False)


class RandomCropFlip:
    """The usual CIFAR augmentation on a whole batch: a random ``H x W`` crop of the image padded by
    ``padding`` zero pixels on every side, then a horizontal flip with probability 1/2.

    Applied to the standardised batch (so padding is the mean colour, as with ``Normalize`` before
    ``RandomCrop(padding=...)``) and drawn from the loader's generator, so runs are reproducible.
    """

    def __init__(self, padding: int = 4) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        dev = x.device
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            rows = (dy + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
            x = padded.gather(2, rows)  # (B, C, H, W + 2p)
            cols = (dx + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
            x = x.gather(3, cols)
        flip = torch.rand(b, device=dev, generator=generator) < 0.5
        return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
