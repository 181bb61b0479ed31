"""Augmentation of training batches of images (finetune.augment): flips, shifts and random resized crops,
each one batched operation on the device."""

from __future__ import annotations

import math

import torch

from stages.params import AUGMENTS


def augment(
    x: torch.Tensor, gen: torch.Generator, how: str = "flip_shift", crop_min_area: float = 0.35
) -> torch.Tensor:
    """Label-preserving changes to a batch of images, the cheapest defence against memorising a few hundred:
      flip        random horizontal flip;
      flip_shift  flip, and a shift of up to 1/16 of the side (a 1/8 shift left fine-tuning underfitting in
                  10 epochs: train accuracy 0.87);
      crop        random resized crop (Inception / BiT style: a box of crop_min_area..1 of the image with an
                  aspect ratio in 3/4..4/3, scaled back to full size), and flip. Stronger: for longer schedules.
    Each is one batched operation, so a GPU sees a few kernels rather than a loop over images."""
    if how not in AUGMENTS:
        raise ValueError(f"unknown augmentation {how!r}: one of {', '.join(AUGMENTS)}")
    if how == "none":
        return x
    if how == "crop":
        return random_resized_crop(x, gen, crop_min_area)
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    if how == "flip":
        return x
    pad = max(1, h // 16)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, min_area: float) -> torch.Tensor:
    """Random resized crop + horizontal flip of every image in the batch at once: one affine sampling grid
    per image (crop box and flip as a scale and a translation), one bilinear grid_sample for the batch."""
    n = x.shape[0]
    area = min_area + (1 - min_area) * torch.rand(n, generator=gen)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    ratio = log_ratio.exp()
    # box sides as fractions of the image's; a box that would stick out is clipped to the image
    sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    # the box centre, in grid_sample's [-1, 1] coordinates, anywhere that keeps the box inside
    tx = (1 - sx) * (2 * torch.rand(n, generator=gen) - 1)
    ty = (1 - sy) * (2 * torch.rand(n, generator=gen) - 1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
