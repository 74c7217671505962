"""Training augmentation: paired geometry (radiograph and targets alike) and radiograph-only intensity.

Each random transform draws its parameters from a ``torch.Generator`` and hands them to a
deterministic twin (:func:`affine`, :func:`adjust_intensity`) that tests can call with known values,
the way TorchIO separates a random transform from the one it applies.

Geometry: one affine per sample (rotation about the crop centre, isotropic scale, shift), applied
with the same sampling grid to the radiograph and to every DRR channel and mask, so a pixel of the
input stays paired with its target. Intensity (radiograph only, the targets are physical g/cm2):
a gamma curve and a contrast change, Gaussian noise, and a new overall exposure scale and offset
(what the model's input normalisation removes, so only the non-linear parts teach it anything, as
intended). Given each crop's whole-radiograph overview, the tone curve acts on the whole radiograph's
range and changes the overview alike (:func:`tone_anchor`), as a DX workstation's tone curve changes
the whole image and so the input scale taken from it; without one, on the crop's own range; optionally unsharp masking of random strength and
width (:func:`unsharp_mask`: the edge enhancement every DX processing applies in its own way, to which
the validation's multi-pose sweep found the model's BMD sensitive), and optionally a lossy JPEG round
trip at a random quality (:func:`jpeg_compress`: what an archive or a teleradiology link does to a radiograph; the
validation's JPEG sweep measures the model against it). Exact zeros, the padding outside the
radiograph, stay zero.

Example:
    >>> import torch
    >>> x = torch.zeros(1, 1, 8, 8); x[0, 0, 3, 2] = 1
    >>> theta = shift_matrix(torch.tensor([[0.0, 2.0]]), (8, 8))  # two columns to the right
    >>> affine(x, theta)[0, 0].nonzero().tolist()
    [[3, 4]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def shift_matrix(shift_px: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, 2, 3) affine (output -> input, normalised coordinates) that moves content by (rows, cols) pixels."""
    h, w = shape
    theta = torch.zeros(len(shift_px), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shift_px[:, 1] / w
    theta[:, 1, 2] = -2.0 * shift_px[:, 0] / h
    return theta


def affine_matrix(rotation_deg: torch.Tensor, scale: torch.Tensor, shift_px: torch.Tensor,
                  shape: tuple[int, int]) -> torch.Tensor:
    """(N, 2, 3) affine for ``F.affine_grid``: content rotated by ``rotation_deg`` (counter-clockwise
    as displayed), scaled by ``scale`` about the centre, then moved by ``shift_px`` (rows, cols).

    Built in pixel units, so a rotation stays a rotation on a non-square crop.
    """
    h, w = shape
    a = torch.deg2rad(rotation_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    # forward map of content, in pixel coordinates (x = col, y = row) about the centre
    fwd = torch.zeros(len(a), 3, 3)
    fwd[:, 0, 0], fwd[:, 0, 1] = scale * cos, scale * sin
    fwd[:, 1, 0], fwd[:, 1, 1] = -scale * sin, scale * cos
    fwd[:, 0, 2], fwd[:, 1, 2] = shift_px[:, 1], shift_px[:, 0]
    fwd[:, 2, 2] = 1.0
    inv = torch.linalg.inv(fwd)  # affine_grid wants output -> input
    to_px = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0]))
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0]))
    return (to_norm @ inv @ to_px)[:, :2]


def affine(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (N, C, H, W) with per-sample ``theta`` (N, 2, 3); outside the image is 0."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def adjust_intensity(x: torch.Tensor, gamma: torch.Tensor, contrast: torch.Tensor, noise: torch.Tensor,
                     gain: torch.Tensor, offset: torch.Tensor, generator: torch.Generator | None = None,
                     scale: torch.Tensor | None = None, anchor: torch.Tensor | None = None):
    """Radiograph (N, 1, H, W) with per-sample gamma, contrast, noise (fraction of the tone range),
    gain and offset (exposure). Exact zeros (padding beyond the radiograph) stay zero.

    The tone curve (gamma, contrast) acts on the range ``anchor`` (N, 2: the intensities it maps from 0
    and 1), by default the image's own 1st and 99th percentiles. A DX workstation's tone curve acts on
    the whole radiograph: give a crop and its radiograph's overview the overview's range
    (:func:`tone_anchor`) and both change as the whole image would.

    With ``scale`` (N, 2: the whole radiograph's intensities that the network maps to 0 and 1, see
    :func:`bonedrr.model.network.overview_scale`), returns ``(image, scale)`` with the same exposure
    change applied to the scale, as it would be to the whole radiograph (the tone curve's change of it
    is not: recompute the scale from an overview changed alike instead)."""
    from bonedrr.model.network import robust_range

    outside = x == 0  # padding beyond the radiograph stays exactly 0
    lo, hi = (v.view(-1, 1, 1, 1) for v in (robust_range(x) if anchor is None else anchor.to(x.device).unbind(1)))
    span = (hi - lo).clamp_min(1e-6)
    u = ((x - lo) / span).clamp(0, 1.5)
    u = u ** gamma.view(-1, 1, 1, 1)
    u = 0.5 + (u - 0.5) * contrast.view(-1, 1, 1, 1)
    if generator is not None:
        u = u + noise.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator).to(x.device)
    out = (u * span + lo) * gain.view(-1, 1, 1, 1) + offset.view(-1, 1, 1, 1) * span
    out = out.masked_fill(outside, 0.0)
    if scale is None:
        return out
    return out, scale * gain.view(-1, 1) + offset.view(-1, 1) * span.view(-1, 1)


def unsharp_mask(x: torch.Tensor, amount: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Radiograph (N, 1, H, W) + ``amount`` * (itself - its Gaussian blur of ``sigma_px``), per sample
    (N,); amount 0 leaves a sample as it is, a negative amount softens. The blur leaves the padding out
    (normalised convolution), so a crop's edge at the radiograph's border gets no halo, and exact zeros
    stay zero. Linear, so an exposure change before or after it is the same.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[..., 3:6, 3:6] = 2.0; x[..., :, 0] = 0  # a bright square on 0
        >>> x = x + 1.0  # on a background of 1
        >>> y = unsharp_mask(x, torch.tensor([0.5]), torch.tensor([1.5]))
        >>> bool(y[0, 0, 4, 4] > x[0, 0, 4, 4]), bool(y[0, 0, 4, 1] < x[0, 0, 4, 1])
        (True, True)
    """
    out = x.clone()
    body = (x != 0).to(x.dtype)
    for i in torch.nonzero(amount != 0).flatten().tolist():
        sigma = float(sigma_px[i])
        radius = max(1, int(math.ceil(3 * sigma)))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()

        def blur(image: torch.Tensor) -> torch.Tensor:
            image = F.conv2d(image, kernel.view(1, 1, -1, 1), padding=(radius, 0))
            return F.conv2d(image, kernel.view(1, 1, 1, -1), padding=(0, radius))

        mask = body[i:i + 1]
        smooth = blur(x[i:i + 1] * mask) / blur(mask).clamp_min(1e-6)
        out[i:i + 1] = (x[i:i + 1] + amount[i] * (x[i:i + 1] - smooth)) * mask
    return out


def jpeg_compress(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Radiograph (N, 1, H, W), each sample mapped linearly to 8 bits (the range of its pixels that are
    not padding), JPEG-encoded at its ``quality`` (N,: Pillow's 1-95; 0 leaves the sample as it is),
    decoded and mapped back. Exact zeros (padding beyond the radiograph) stay zero.

    Example:
        >>> x = torch.linspace(100, 900, 64 * 32).reshape(1, 1, 64, 32)
        >>> y = jpeg_compress(x, torch.tensor([90]))
        >>> bool((y - x).abs().max() < 10), bool(torch.equal(jpeg_compress(x, torch.tensor([0])), x))
        (True, True)
    """
    import io

    import numpy as np
    from PIL import Image

    out = x.clone()
    for i in torch.nonzero(quality > 0).flatten().tolist():
        image = x[i, 0].detach().float().cpu().numpy()
        body = image != 0
        if not body.any():
            continue
        lo, hi = float(image[body].min()), float(image[body].max())
        step = (hi - lo) / 255.0 if hi > lo else 1.0
        u8 = np.clip(np.round((image - lo) / step), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(u8).save(buffer, "JPEG", quality=int(quality[i]))
        decoded = np.asarray(Image.open(buffer), np.float32) * step + lo
        out[i, 0] = torch.from_numpy(np.where(body, decoded, 0.0)).to(x.device, x.dtype)
    return out


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of the random augmentation (0 switches a part off).

    Args:
        rotate_deg: Rotation drawn uniformly in +-this.
        scale: Scale drawn uniformly in 1 +- this.
        shift: Shift drawn uniformly in +- this fraction of the crop's height and width.
        gamma: log(gamma) drawn uniformly in +- this.
        contrast: Contrast factor in 1 +- this.
        noise: Noise standard deviation drawn in 0..this (fraction of the robust range).
        unsharp: Unsharp-masking amount drawn uniformly in -this/2..this (0: off; :func:`unsharp_mask`).
        unsharp_sigma_px: (smallest, largest) width of its blur, crop pixels, drawn uniformly.
        jpeg: Probability of a JPEG round trip (:func:`jpeg_compress`), last, after the intensity changes.
        jpeg_quality: (lowest, highest) Pillow quality, drawn uniformly (integers).
    """

    rotate_deg: float = 5.0
    scale: float = 0.05
    shift: float = 0.04
    gamma: float = 0.3
    contrast: float = 0.2
    noise: float = 0.02
    unsharp: float = 0.0
    unsharp_sigma_px: tuple[float, float] = (3.0, 10.0)
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (5, 95)

    def __post_init__(self):
        object.__setattr__(self, "jpeg_quality", tuple(int(q) for q in self.jpeg_quality))
        object.__setattr__(self, "unsharp_sigma_px", tuple(float(v) for v in self.unsharp_sigma_px))
        from bonedrr.errors import BonedrrError

        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 95:
            raise BonedrrError(f"train augment jpeg_quality must be [lowest, highest] within 1-95, not {list(self.jpeg_quality)}")
        low, high = self.unsharp_sigma_px
        if not 0 < low <= high:
            raise BonedrrError("train augment unsharp_sigma_px must be [smallest, largest] above 0, not "
                               f"{list(self.unsharp_sigma_px)}")


def tone_anchor(overview: torch.Tensor) -> torch.Tensor:
    """(N, 2): the range of a whole radiograph's overview (N, 1, h, w) that a tone curve acts on (its 1st
    and 99th percentiles, padding left out)."""
    from bonedrr.model.network import robust_range

    return torch.stack(robust_range(overview), 1)


class RandomAugment:
    """Draws one geometric and one intensity transform per sample and applies them.

    Args:
        settings: The strengths.
        generator: The source of randomness (seeded by the trainer per epoch, so a resumed run draws
            the same transforms).
        tone: Change the tone curve (gamma, contrast) and the exposure's gain. False for raw
            radiographs read on the detector's own log scale (train ``input_scale: detector``): they
            have no tone curve, and a dose change only shifts a log image (the offset, still drawn),
            while a gain would change the scale that carries the absolute density.
        offset: Shift the exposure's offset. False for raw radiographs whose input's 0 is the
            detector's open beam (train ``open_beam``): on that scale an offset is density.
    """

    def __init__(self, settings: AugmentSettings, generator: torch.Generator, tone: bool = True,
                 offset: bool = True):
        self.s, self.g, self.tone, self.offset = settings, generator, tone, offset

    def _uniform(self, n: int, half_width: float) -> torch.Tensor:
        return (torch.rand(n, generator=self.g) * 2 - 1) * half_width

    def __call__(self, xray: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None,
                 overview: torch.Tensor | None = None):
        """Augment a batch: xray (N, 1, H, W), targets (N, C, H, W) (DRRs and masks).

        With ``overview`` (N, 1, h, w: each crop's whole radiograph), the tone curve and the exposure
        change act on the crop and its overview alike, anchored on the overview's range, and the result
        is ``(xray, targets, overview)`` (compute the input scale from that overview). With ``scale``
        (N, 2, the input scale of :func:`bonedrr.model.network.overview_scale`), it is
        ``(xray, targets, scale)``, the scale moved by the same exposure change."""
        n, _, h, w = xray.shape
        s = self.s
        theta = affine_matrix(self._uniform(n, s.rotate_deg), 1 + self._uniform(n, s.scale),
                              torch.stack([self._uniform(n, s.shift * h), self._uniform(n, s.shift * w)], 1), (h, w))
        # Zero padding, as the shards pad a crop that reaches beyond the radiograph (the model's input
        # normalisation leaves exact zeros out).
        xray = affine(xray, theta)
        targets = affine(targets, theta)
        gamma = torch.exp(self._uniform(n, s.gamma))
        contrast = 1 + self._uniform(n, s.contrast)
        noise = torch.rand(n, generator=self.g) * s.noise
        gain = torch.exp(self._uniform(n, math.log(2.0)))
        offset = self._uniform(n, 0.5)
        if not self.tone:  # drawn all the same, so the other transforms are those of a tone run
            gamma, contrast, gain = torch.ones(n), torch.ones(n), torch.ones(n)
        if not self.offset:
            offset = torch.zeros(n)
        if overview is not None:
            anchor = tone_anchor(overview)
            xray = adjust_intensity(xray, gamma, contrast, noise, gain, offset, self.g, anchor=anchor)
            overview = adjust_intensity(overview, gamma, contrast, torch.zeros(n), gain, offset, anchor=anchor)
            return self._jpeg(self._unsharp(xray)), targets, overview
        if scale is None:
            xray = adjust_intensity(xray, gamma, contrast, noise, gain, offset, self.g)
            return self._jpeg(self._unsharp(xray)), targets
        xray, scale = adjust_intensity(xray, gamma, contrast, noise, gain, offset, self.g, scale=scale)
        return self._jpeg(self._unsharp(xray)), targets, scale

    def _unsharp(self, xray: torch.Tensor) -> torch.Tensor:
        if self.s.unsharp <= 0:  # no draw: the random stream of settings without it stays as it was
            return xray
        n = len(xray)
        amount = torch.rand(n, generator=self.g) * 1.5 * self.s.unsharp - 0.5 * self.s.unsharp
        low, high = self.s.unsharp_sigma_px
        sigma = low + torch.rand(n, generator=self.g) * (high - low)
        return unsharp_mask(xray, amount, sigma)

    def _jpeg(self, xray: torch.Tensor) -> torch.Tensor:
        if self.s.jpeg <= 0:  # no draw: the random stream of settings without JPEG stays as it was
            return xray
        n = len(xray)
        low, high = self.s.jpeg_quality
        quality = torch.randint(low, high + 1, (n,), generator=self.g)
        quality = torch.where(torch.rand(n, generator=self.g) < self.s.jpeg, quality, 0)
        return jpeg_compress(xray, quality)
