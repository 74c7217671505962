"""The decomposition network: a small U-Net that maps a radiograph crop to DRR channels (g/cm2).

The radiograph enters as stored (any exposure, window or bit depth): :class:`RobustNormalise` maps
it to a common scale first, so a DICOM, a PNG or a JPEG of the same hip give the network the same
input. The scale comes from the whole radiograph (:func:`overview_scale`: its 1st and 50th
percentiles) or, for models trained before it, from the crop's own 1st and 99th percentiles. The
crop's own range is a poor reference for density: a hip crop's brightest pixels are bone, so
dividing by its range divides out much of the bone's density (docs/validation.md, "The earlier whole demo"). The output is linear (g/cm2, as the targets); DRRs are non-negative, which
:meth:`UNet.forward` does not force (the L1 loss learns it), and ``predict`` clips.

Optionally the network is conditioned on acquisition facts that a processed image does not show (the
tube voltage: a harder beam gives bone less contrast, which a network of the image alone reads as less
density). The first GroupNorm removes any overall scale and offset of the input, so a constant input
plane would carry little; instead each decoder level (and the bottleneck) gets a FiLM layer (Perez et
al. 2018): a per-channel scale and shift, linear in the conditions, starting as the identity. The
same way the network can get what the image shows but its normalisation hides (:func:`tone_condition`):
the shape of the whole radiograph's tone curve, of which the input scale keeps two points, and the
crop's brightness against its radiograph, which the first GroupNorm divides out.

Example:
    >>> import torch
    >>> net = UNet(in_channels=1, out_channels=3, base_channels=4, depth=2)
    >>> net(torch.rand(2, 1, 32, 16)).shape
    torch.Size([2, 3, 32, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bonedrr.model.portable import (AIR_FRACTION, OVERVIEW_PERCENTILES, TONE_CROP_QUANTILES, TONE_OVERVIEW_QUANTILES,
                                    film_widths)


def robust_range(x: torch.Tensor, low: float = 0.01, high: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of (N, ...): the ``low`` and ``high`` quantiles of its pixels, exact zeros left out.

    Exact zeros are where a crop reaches beyond the radiograph (the shards' and the augmentation's
    padding): counting them would make a crop's intensity scale depend on how much of it is outside.
    """
    flat = x.flatten(1).float()
    flat = flat.masked_fill(flat == 0, float("nan"))
    q = torch.nanquantile(flat, torch.tensor([low, high], device=x.device, dtype=flat.dtype), dim=1)
    q = torch.nan_to_num(q, nan=0.0)  # an image of zeros only
    return q[0], q[1]


def _sorted_quantiles(values: torch.Tensor, start: torch.Tensor, count: torch.Tensor, quantiles) -> torch.Tensor:
    """(N, len(quantiles)) of rows of ascending ``values`` (N, M), each row's run of ``count`` values from
    ``start`` (N, 1), linearly interpolated as :func:`torch.quantile`; NaN where a run is empty."""
    q = torch.tensor(quantiles, dtype=values.dtype, device=values.device)
    rank = q * (count - 1).clamp_min(0).to(values.dtype)  # (N, Q)
    below = rank.floor()
    last = (start + count - 1).clamp_min(0)
    lo = values.gather(1, (start + below.long()).clamp_max(last))
    hi = values.gather(1, (start + rank.ceil().long()).clamp_max(last))
    return torch.lerp(lo, hi, rank - below).masked_fill(count == 0, float("nan"))


def _body_quantiles(overview: torch.Tensor, quantiles, fallback) -> torch.Tensor:
    """(N, len(quantiles)) of each overview's pixels that are not air or padding (:data:`AIR_FRACTION`);
    the ``fallback`` quantiles of all its pixels where none is left.

    One sort per overview serves every quantile: the body is the sorted pixels' top run (a training
    step computes this for each batch on the host, where three sorts were most of its time)."""
    values = overview.flatten(1).float().sort(1).values
    n, m = values.shape
    everything = (torch.zeros(n, 1, dtype=torch.long, device=values.device),
                  torch.full((n, 1), m, dtype=torch.long, device=values.device))
    bottom = values[:, :1]
    top = _sorted_quantiles(values, *everything, [0.995])
    air = (values <= bottom + AIR_FRACTION * (top - bottom)).sum(1, keepdim=True)
    q = _sorted_quantiles(values, air, m - air, quantiles)
    return torch.where(torch.isnan(q), _sorted_quantiles(values, *everything, fallback), q)


def overview_scale(overview: torch.Tensor) -> torch.Tensor:
    """(N, 2): the intensities of each whole-radiograph overview (N, ...) that the network's input
    maps to 0 and 1 (:data:`OVERVIEW_PERCENTILES` of the pixels that are not air or padding,
    :data:`AIR_FRACTION`)."""
    return _body_quantiles(overview, [p / 100.0 for p in OVERVIEW_PERCENTILES], [0.0, 1.0])


def detector_scale(overview: torch.Tensor, span: float, open_beam: float | None = None) -> torch.Tensor:
    """(N, 2): the input scale of raw radiographs on the detector's own log scale (train ``input_scale:
    detector``): ``open_beam`` (the detector's stored value where nothing attenuates) or, without it,
    each overview's first :data:`OVERVIEW_PERCENTILES` point of the body maps to 0, and that plus one
    ``span``, the same for every radiograph, to 1; the twin of
    :func:`bonedrr.model.portable.detector_scale`."""
    if open_beam is None:
        low = overview_scale(overview)[:, :1]
    else:
        low = torch.full((len(overview), 1), float(open_beam), dtype=torch.float32, device=overview.device)
    return torch.cat([low, low + float(span)], 1)


def body_quantiles(overview: torch.Tensor, quantiles) -> torch.Tensor:
    """(N, len(quantiles)) of the body in each overview (N, ...); the twin of
    :func:`bonedrr.model.portable.body_quantiles`."""
    return _body_quantiles(overview, list(quantiles), list(quantiles))


def tone_condition(crops: torch.Tensor, scale: torch.Tensor, overview: torch.Tensor) -> torch.Tensor:
    """(N, 16): the ``tone`` condition of crops (N, ...) with their input scale (N, 2) and their
    radiographs' overviews (N, ...); the twin of :func:`bonedrr.model.portable.tone_condition`."""
    flat = crops.flatten(1).float()
    flat = flat.masked_fill(flat == 0, float("nan"))
    crop_q = torch.nanquantile(flat, torch.tensor(TONE_CROP_QUANTILES, dtype=flat.dtype, device=flat.device), dim=1)
    crop_q = torch.nan_to_num(crop_q.T, nan=0.0)
    lo = scale[:, :1].float()
    span = (scale[:, 1:2].float() - lo).clamp_min(1e-6)
    return (torch.cat([body_quantiles(overview, TONE_OVERVIEW_QUANTILES), crop_q], 1) - lo) / span


def input_contrast(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(N,): each crop's (N, ...) mean as the network's input gets it (exact zeros, the padding, left
    out; ``scale`` (N, 2) as :class:`RobustNormalise`'s), at least 1e-3: how much the crop attenuates
    above its radiograph's thinnest body. A mean, not a percentile range, so noise does not inflate it.
    The twin of :func:`bonedrr.model.portable.input_contrast`."""
    flat = x.flatten(1).float()
    kept = flat != 0
    if scale is None:
        lo, hi = robust_range(x)
    else:
        lo, hi = scale[:, 0].to(flat), scale[:, 1].to(flat)
    span = (hi - lo).clamp_min(1e-6)
    mean = (flat * kept).sum(1) / kept.sum(1).clamp_min(1)
    return ((mean - lo) / span).clamp_min(1e-3)


class RobustNormalise(nn.Module):
    """Per image: (x - low) / (high - low), with (low, high) given (``scale``, e.g. from
    :func:`overview_scale`) or else the image's own percentiles (exact zeros, the padding outside the
    radiograph, left out: :func:`robust_range`).

    Args:
        low, high: The image's own percentiles (0-100) mapped to 0 and 1 when no scale is given.
    """

    def __init__(self, low: float = 1.0, high: float = 99.0):
        super().__init__()
        self.low, self.high = low / 100.0, high / 100.0

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (N, ...); ``scale`` (N, 2) or None."""
        lo, hi = (scale[:, 0], scale[:, 1]) if scale is not None else robust_range(x, self.low, self.high)
        lo = lo.to(x.device, torch.float32).view(-1, *([1] * (x.dim() - 1)))
        span = (hi.to(x.device, torch.float32).view_as(lo) - lo).clamp_min(1e-6)
        return ((x.float() - lo) / span).to(x.dtype)


def _block(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batches are small and the statistics must not depend on the batch
    # (a prediction of one image equals its prediction in a batch).
    groups = max(1, min(8, cout // 4))
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1, inplace=True),
    )


class UNet(nn.Module):
    """A U-Net with ``depth`` poolings; channels double per level from ``base_channels``.

    Input height and width must be divisible by 2**depth.

    Args:
        in_channels: Input channels (1: the normalised radiograph).
        out_channels: Output channels (the DRR channels of a stage).
        base_channels: Channels of the first level.
        depth: Number of down-sampling steps.
        normalise: Normalise the input with :class:`RobustNormalise` first (the radiograph as stored).
        conditions: Number of scalar conditions per image (0: none; 1: the tube voltage,
            :func:`bonedrr.model.portable.kvp_condition`; 16: :func:`tone_condition`; 17: both), each
            entering through FiLM layers.
        equivariant: Multiply the output by the input crop's mean level (:func:`input_contrast`). The
            GroupNorms make the U-Net blind to its input's scale: twice the contrast gives the same
            output. An attenuation image twice as contrasted holds twice the density, so with this the
            output follows the input's scale, as the physics of a raw log image does. One flag per
            output channel to multiply only some: a thickness (cm) is a shape, not a density, and does
            not follow the input's scale.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 3,
                 normalise: bool = True, conditions: int = 0, equivariant: bool | Sequence[bool] = False):
        super().__init__()
        flags = [bool(equivariant)] * out_channels if isinstance(equivariant, bool) else [bool(f) for f in equivariant]
        if len(flags) != out_channels:
            raise ValueError(f"equivariant: one flag per output channel ({out_channels}), got {len(flags)}")
        if any(flags):  # in the state dict, so that the NumPy twin knows: 1 (every channel) or one flag each
            self.register_buffer("equivariant", torch.ones(()) if all(flags) else torch.tensor(flags, dtype=torch.float32))
        self.is_equivariant = any(flags)
        self.depth = depth
        self.normalise = RobustNormalise() if normalise else nn.Identity()
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])]
                                  + [_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.conditions = conditions
        self.film = nn.ModuleList([nn.Linear(conditions, 2 * w) for w in film_widths(base_channels, depth)]) \
            if conditions else None
        for layer in self.film or []:  # the identity to start: an unconditioned U-Net
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _modulate(self, x: torch.Tensor, level: int, condition: torch.Tensor | None) -> torch.Tensor:
        if self.film is None:
            return x
        gamma, beta = self.film[level](condition.to(x.device, x.dtype)).chunk(2, dim=1)
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (N, in_channels, H, W) as stored; ``scale`` (N, 2): the intensities mapped to 0 and 1
        (:func:`overview_scale`), or None for the crop's own range; ``condition`` (N, conditions),
        required when the network has conditions."""
        if self.film is not None and (condition is None or condition.shape != (len(x), self.conditions)):
            raise ValueError(f"this U-Net needs a condition of shape ({len(x)}, {self.conditions}), got "
                             f"{None if condition is None else tuple(condition.shape)}")
        contrast = input_contrast(x, scale) if self.is_equivariant else None
        x = self.normalise(x, scale) if isinstance(self.normalise, RobustNormalise) else x
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self._modulate(skips.pop(), 0, condition)
        for level, block in enumerate(self.up, start=1):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self._modulate(block(torch.cat([x, skip], 1)), level, condition)
        out = self.head(x)
        if contrast is None:
            return out
        flags = self.equivariant.to(out.dtype).view(1, -1, 1, 1)  # (1, 1 or C, 1, 1)
        return out * (contrast.to(out.dtype).view(-1, 1, 1, 1) * flags + (1 - flags))


class PatchDiscriminator(nn.Module):
    """A conditional PatchGAN (pix2pix): judges (radiograph, DRR) pairs patch by patch.

    Args:
        in_channels: Radiograph channels + DRR channels.
        base_channels: Channels of the first layer (doubled by each strided layer).
        layers: Number of strided convolutions (receptive field grows with it).
    """

    def __init__(self, in_channels: int, base_channels: int = 16, layers: int = 3):
        super().__init__()
        self.normalise = RobustNormalise()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = base_channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.GroupNorm(max(1, min(8, c * 2 // 4)), c * 2),
                     nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, xray: torch.Tensor, drr: torch.Tensor) -> torch.Tensor:
        """Logits, one per patch."""
        return self.net(torch.cat([self.normalise(xray), drr], 1))
