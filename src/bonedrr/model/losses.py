"""Training losses of the decomposition: L1, gradient correlation, and a conditional GAN term.

Gradient correlation (GC) is the registration stage's similarity (:func:`bonedrr.register.gradient_correlation`)
written in torch so that it can be a loss: the mean over rows and columns of the normalised
cross-correlation of the two images' Sobel derivatives, judged inside a border of 2 pixels. It is
insensitive to a DRR's overall scale and offset and rewards sharp, well-placed edges, which L1 alone
blurs; the paper trains with L1 + GC (+ a PatchGAN term in BMD-GAN).

Example:
    >>> import torch
    >>> a = torch.rand(1, 1, 16, 16)
    >>> round(float(gradient_correlation(a, 3 * a + 1)), 4)
    1.0
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

_D = torch.tensor([-1.0, 0.0, 1.0])
_S = torch.tensor([1.0, 2.0, 1.0])
#: Sobel kernels as scipy.ndimage.sobel applies them: derivative along rows (axis 0), then columns.
SOBEL = torch.stack([torch.outer(_D, _S), torch.outer(_S, _D)])[:, None]


def sobel(x: torch.Tensor, border: int = 2) -> torch.Tensor:
    """Sobel derivatives of every channel of (N, C, H, W) -> (N, C, 2, H - 2*border, W - 2*border).

    Pixels closer than ``border`` (>= 1) to the edge are dropped, so padding never enters.
    """
    n, c, h, w = x.shape
    g = F.conv2d(x.reshape(n * c, 1, h, w), SOBEL.to(x.device, x.dtype))
    inner = border - 1
    if inner:
        g = g[..., inner:-inner, inner:-inner]
    return g.reshape(n, c, 2, *g.shape[-2:])


def gradient_correlation(a: torch.Tensor, b: torch.Tensor, border: int = 2, eps: float = 1e-12) -> torch.Tensor:
    """GC of each image pair and channel: (N, C, H, W) x 2 -> (N, C), in -1..1.

    Equal to :func:`bonedrr.register.gradient_correlation` of the same 2D images.
    """
    ga = sobel(a.float(), border).flatten(3)
    gb = sobel(b.float(), border).flatten(3)
    ga = ga - ga.mean(-1, keepdim=True)
    gb = gb - gb.mean(-1, keepdim=True)
    ncc = (ga * gb).sum(-1) / torch.sqrt((ga * ga).sum(-1) * (gb * gb).sum(-1) + eps)
    return ncc.mean(-1)


def gc_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GC, averaged over images and channels (0 when every edge matches)."""
    return 1.0 - gradient_correlation(prediction, target).mean()


def l1_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, g/cm2."""
    return F.l1_loss(prediction.float(), target.float())


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of PatchGAN logits against all-real or all-fake labels."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), float(real)))


def soft_bmd(drr: torch.Tensor, threshold_g_cm2: float, softness_g_cm2: float = 0.01) -> torch.Tensor:
    """A differentiable DRR-BMD of each image (N, H, W): the mean over pixels weighted by a sigmoid step
    at the threshold (:func:`bonedrr.bmd.drr_bmd` as ``softness_g_cm2`` -> 0)."""
    w = torch.sigmoid((drr.float() - threshold_g_cm2) / softness_g_cm2)
    return (drr.float() * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-6)


def bmd_loss(prediction: torch.Tensor, target: torch.Tensor, threshold_g_cm2: float) -> torch.Tensor:
    """Mean absolute difference of the soft DRR-BMDs of predicted and true proximal-femur DRRs (g/cm2)."""
    return (soft_bmd(prediction, threshold_g_cm2) - soft_bmd(target, threshold_g_cm2)).abs().mean()
