"""Image complexity by local entropy: the curriculum score of DWA (Geilert, "Pay attention to the Task").

The complexity of an image is the mean over its pixels of the squared local entropy: the Shannon entropy
(bits) of the 8-bit grey values in a disk of radius 5 around the pixel, as scikit-image's
``filters.rank.entropy(image, disk(5))`` computes it (only pixels inside the image count, so border pixels
have smaller neighbourhoods). Scores are min-max normalised over a set of images (a task's training set),
so 0 is its simplest image and 1 its most complex.

Vectorised the way rank filters are computed (Huang's sliding histogram), over a whole chunk of images at
once: each image row keeps the histogram of the disk around its current pixel and the sum
``S = sum_v c_v log2 c_v``; moving one pixel right removes the disk's left edge and adds its right edge
(2 x 11 values for radius 5), and every change of a count ``c`` updates ``S`` by a table lookup. The entropy
is ``log2 n - S / n``, with ``n`` the number of disk pixels inside the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_OUTSIDE = 256  # a 257th "grey value" marking neighbours outside the image; never counted


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` of scikit-image's ``disk(radius)``: every offset with ``dy^2 + dx^2 <= radius^2``."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]


def local_entropy(images: Tensor, radius: int = 5) -> Tensor:
    """Local entropy in bits of uint8 grey images ``(N, H, W)`` over disks of ``radius``: ``(N, H, W)`` float."""
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(f"local_entropy takes uint8 images (N, H, W), got {images.dtype} {tuple(images.shape)}")
    n, h, w = images.shape
    r = int(radius)
    offsets = disk_offsets(r)
    half = {dy: max(dx for d, dx in offsets if d == dy) for dy in range(-r, r + 1)}  # the disk's half-width per row
    dev = images.device
    padded = F.pad(images.long(), (r, r, r, r), value=_OUTSIDE)  # (N, H + 2r, W + 2r)
    # g(c) = c log2 c; the change of S when a count goes from c to c + 1, and from c to c - 1
    c = torch.arange(len(offsets) + 2, dtype=torch.float64)
    g = (torch.special.xlogy(c, c) / math.log(2)).float().to(dev)
    up = torch.cat([g[1:] - g[:-1], g.new_zeros(1)])
    down = torch.cat([g.new_zeros(1), g[:-1] - g[1:]])
    hist = torch.zeros(n, h, _OUTSIDE + 1, dtype=torch.int16, device=dev)  # counts <= 81 fit; small is cache-friendly
    s = torch.zeros(n, h, device=dev)
    step = {+1: torch.ones(n, h, 1, dtype=torch.int16, device=dev)}
    step[-1] = -step[+1]

    def update(values: Tensor, sign: int) -> None:  # values (N, H): one disk pixel per image row
        index = values.unsqueeze(2)
        count = hist.gather(2, index).squeeze(2).long()
        s.add_((up if sign > 0 else down)[count].masked_fill_(values == _OUTSIDE, 0.0))
        hist.scatter_add_(2, index, step[sign])

    def column(dy: int, x: int) -> Tensor:  # the pixels at (y + dy, x) for every row y
        return padded[:, r + dy : r + dy + h, r + x]

    sums = torch.empty(n, h, w, device=dev)
    for dy, dx in offsets:
        update(column(dy, dx), +1)
    sums[:, :, 0] = s
    for x in range(1, w):
        for dy in range(-r, r + 1):
            update(column(dy, x - 1 - half[dy]), -1)
            update(column(dy, x + half[dy]), +1)
        sums[:, :, x] = s
    kernel = torch.zeros(1, 1, 2 * r + 1, 2 * r + 1, device=dev)
    for dy, dx in offsets:
        kernel[0, 0, dy + r, dx + r] = 1
    inside = F.conv2d(F.pad(torch.ones(1, 1, h, w, device=dev), (r, r, r, r)), kernel)[0, 0]  # (H, W): n
    return inside.log2() - sums / inside


def entropy_complexity(images: Tensor, radius: int = 5, chunk: int = 256) -> Tensor:
    """DWA's complexity of each image ``(N, C, H, W)`` uint8 (or floats in [0, 255]): ``(N,)`` in [0, 1].

    The channel mean is rounded to 8 bits, its local entropy squared and averaged over the pixels, and the
    scores min-max normalised over ``images``. Done in chunks of ``chunk`` images to bound memory.
    """
    if images.ndim != 4:
        raise ValueError(f"entropy_complexity takes images (N, C, H, W), got shape {tuple(images.shape)}")
    scores = []
    for start in range(0, images.shape[0], chunk):
        grey = images[start : start + chunk].float().mean(1).round_().clamp_(0, 255).to(torch.uint8)
        scores.append(local_entropy(grey, radius).square().mean((1, 2)))
    score = torch.cat(scores) if scores else torch.zeros(0)
    if score.numel() == 0:
        return score
    low, high = score.min(), score.max()
    return (score - low) / (high - low).clamp_min(1e-4)  # the normalisation (and floor) of DWA's code
