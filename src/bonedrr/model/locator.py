"""The hip locator: where the femoral head is in a whole radiograph.

A small U-Net turns an overview of the radiograph (the whole image resized to 128 x 256, aspect kept,
zero padded: :func:`bonedrr.shards.overview_grid`; the shards store one per sample, with the
femoral-head centre) into a
heatmap of the right hip's femoral-head centre (the shards' orientation: a left hip is seen in the
mirrored image). The position is the heatmap's soft-argmax around its peak. For a full AP pelvis
radiograph the locator runs twice, on the image and on its mirror, to find both hips.

Example:
    >>> heat = gaussian_heatmap(torch.tensor([[10.0, 20.0]]), (32, 64))
    >>> rc, confidence = peak(torch.log(heat + 1e-9))
    >>> rc.round().tolist()
    [[10.0, 20.0]]
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


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
