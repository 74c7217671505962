"""The hip locator: where the femoral head is in a whole radiograph.

A small U-Net turns an overview of the radiograph (the whole image resized to :data:`OVERVIEW_SHAPE`,
aspect kept, zero padded; the shards store one per sample, with the femoral-head centre) into a
heatmap of the right hip's femoral-head centre (the shards' orientation: a left hip is seen in the
mirrored image). The position is the heatmap's soft-argmax around its peak. For a full AP pelvis
radiograph the locator runs twice, on the image and on its mirror, to find both hips.

Example:
    >>> import numpy as np
    >>> image = np.zeros((100, 400), np.float32)
    >>> ov, t = make_overview(image)
    >>> ov.shape, t.to_image(np.array([63.5, 127.5])).round(2).tolist()
    ((128, 256), [49.5, 199.5])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

#: Overview size (rows, cols), as the shards store it.
OVERVIEW_SHAPE = (128, 256)


@dataclass(frozen=True)
class OverviewTransform:
    """Overview pixel = image pixel * ``scale`` + ``offset`` (row, col), pixel centres at integers."""

    scale: float
    offset: tuple[float, float]

    def to_image(self, rc: np.ndarray) -> np.ndarray:
        return (np.asarray(rc, float) - np.asarray(self.offset)) / self.scale

    def to_overview(self, rc: np.ndarray) -> np.ndarray:
        return np.asarray(rc, float) * self.scale + np.asarray(self.offset)


def make_overview(image: np.ndarray, shape: tuple[int, int] = OVERVIEW_SHAPE) -> tuple[np.ndarray, OverviewTransform]:
    """The whole image resized to ``shape`` (aspect kept, centred, zero padded) and its transform."""
    h, w = image.shape
    scale = min(shape[0] / h, shape[1] / w)
    nh, nw = h * scale, w * scale
    off = ((shape[0] - nh) / 2, (shape[1] - nw) / 2)
    # pixel centres: overview (i + 0.5) = (image (r + 0.5)) * scale + off
    offset = (off[0] + 0.5 * scale - 0.5, off[1] + 0.5 * scale - 0.5)
    transform = OverviewTransform(scale, offset)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    src = transform.to_image(np.stack([rr, cc], -1).reshape(-1, 2)).T
    smooth = ndimage.gaussian_filter(image.astype(np.float32), max(0.0, 0.5 / scale - 0.5)) if scale < 1 else image
    ov = ndimage.map_coordinates(smooth.astype(np.float32), src, order=1, mode="constant", cval=0.0)
    inside = ((src[0] >= -0.5) & (src[0] <= h - 0.5) & (src[1] >= -0.5) & (src[1] <= w - 0.5))
    return (ov * inside).reshape(shape).astype(np.float32), transform


def gaussian_heatmap(centres: torch.Tensor, shape: tuple[int, int], sigma: float = 3.0) -> torch.Tensor:
    """(N, 1, H, W) Gaussians (peak 1) at (row, col) ``centres`` (N, 2)."""
    rr = torch.arange(shape[0], dtype=torch.float32).view(1, -1, 1)
    cc = torch.arange(shape[1], dtype=torch.float32).view(1, 1, -1)
    d2 = (rr - centres[:, 0].view(-1, 1, 1)) ** 2 + (cc - centres[:, 1].view(-1, 1, 1)) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))[:, None]


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the spatial softmax of ``logits`` and the normalised ``target`` heatmap.

    Samples whose target left the image (an augmentation moved the head out) are skipped.
    """
    mass = target.flatten(1).sum(1)
    keep = mass > 1.0
    if not keep.any():
        return logits.sum() * 0.0
    p = target.flatten(1)[keep] / mass[keep, None]
    return -(p * F.log_softmax(logits.flatten(1)[keep].float(), 1)).sum(1).mean()


def peak(logits: torch.Tensor, window: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each heatmap (N, 1, H, W): soft-argmax in a window around the maximum; and the
    softmax mass in that window (a confidence, 0..1)."""
    n, _, h, w = logits.shape
    prob = F.softmax(logits.flatten(1).float(), 1).view(n, h, w)
    idx = prob.flatten(1).argmax(1)
    out, conf = torch.zeros(n, 2), torch.zeros(n)
    for i in range(n):
        r, c = int(idx[i] // w), int(idx[i] % w)
        r0, r1, c0, c1 = max(0, r - window), min(h, r + window + 1), max(0, c - window), min(w, c + window + 1)
        p = prob[i, r0:r1, c0:c1]
        rr = torch.arange(r0, r1, dtype=torch.float32).view(-1, 1)
        cc = torch.arange(c0, c1, dtype=torch.float32).view(1, -1)
        s = p.sum()
        out[i] = torch.stack([(p * rr).sum() / s, (p * cc).sum() / s])
        conf[i] = s
    return out, conf


class Locator(torch.nn.Module):
    """The locator network: overview (N, 1, 128, 256) -> heatmap logits at 1/``pool`` resolution.

    Args:
        base_channels: Channels of the U-Net's first level.
        depth: Its down-sampling steps.
        pool: The overview is averaged over ``pool`` x ``pool`` blocks first (speed; the soft-argmax
            keeps sub-pixel precision).
    """

    def __init__(self, base_channels: int = 8, depth: int = 3, pool: int = 2):
        super().__init__()
        from bonedrr.model.network import UNet

        self.pool = pool
        self.net = UNet(1, 1, base_channels, depth)

    def forward(self, overview: torch.Tensor) -> torch.Tensor:
        return self.net(F.avg_pool2d(overview, self.pool) if self.pool > 1 else overview)

    def to_pooled(self, rc: torch.Tensor) -> torch.Tensor:
        """Overview pixel (row, col) -> pooled heatmap pixel."""
        return (rc + 0.5) / self.pool - 0.5

    def to_overview(self, rc: torch.Tensor) -> torch.Tensor:
        return (rc + 0.5) * self.pool - 0.5

    def locate(self, overview: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) femoral-head centres in overview pixels and (N,) confidences."""
        rc, conf = peak(self(overview).float().cpu())
        return self.to_overview(rc), conf
