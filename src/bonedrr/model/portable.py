"""The trained model without torch: what ``bonedrr estimate`` runs.

Importing torch takes 1.5-5 s on a CPU, longer than decomposing a radiograph. So a trained model folder
holds, beside ``model.pt``, ``model.npz``: the same weights as NumPy arrays and the model's facts as
JSON. :class:`PortableModel` runs the networks' forward pass (:class:`bonedrr.model.network.UNet`, the
:class:`bonedrr.model.locator.Locator`) in NumPy from it. The tests hold it to the torch model on a
trained model.

:class:`HipModel` is what both models share and needs no torch: the crop geometry, the input scale
from the whole radiograph, BMD, the DXA calibration and the hip search.
:class:`bonedrr.train.DecompositionModel` is its torch subclass.

Example:
    >>> rng = np.random.default_rng(0)
    >>> weights = {"down.0.0.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
    ...            "down.0.3.weight": rng.normal(size=(4, 4, 3, 3)).astype(np.float32),
    ...            "head.weight": rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "head.bias": np.zeros(2, np.float32)}
    >>> weights.update({f"down.0.{j}.{p}": np.full(4, v, np.float32) for j in (1, 4) for p, v in (("weight", 1), ("bias", 0))})
    >>> unet_forward(weights, rng.random((1, 1, 8, 4), np.float32), depth=0).shape
    (1, 2, 8, 4)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonedrr.bmd import BMD_CHANNEL, BMD_THRESHOLD_G_CM2, drr_bmd, drr_vbmd_of
from bonedrr.errors import BonedrrError, InputError

#: The portable copy of a model folder's ``model.pt``.
PORTABLE_FILE = "model.npz"
#: Percentiles (0-100) of the body in the whole radiograph's overview mapped to 0 and 1 of the
#: network's input: the thinnest soft tissue and the median (mostly soft tissue, so bone density stays
#: visible).
OVERVIEW_PERCENTILES = (1.0, 50.0)
#: Pixels within this fraction of the overview's range (minimum to 99.5th percentile) above its
#: minimum are air or padding and left out: a radiograph's air is exactly 0 in one file and 1-3 in a
#: JPEG of it, and the overview's letterbox is 0; counting them would move the scale.
AIR_FRACTION = 0.02
#: The network's conditions (train ``network.condition``): ``none``; ``kvp``, the radiograph's tube
#: voltage (DICOM KVP), which sets the bone's contrast and which a processed image does not show;
#: ``tone``, quantiles of the whole radiograph and of the crop (:func:`tone_condition`); or both.
CONDITIONS = ("none", "kvp", "tone", "kvp+tone")
#: Quantiles of the body in the whole radiograph's overview that a ``tone``-conditioned network gets, in
#: its input's units: the shape of the radiograph's tone curve, which the input scale's two points
#: (:data:`OVERVIEW_PERCENTILES`) leave open.
TONE_OVERVIEW_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: Quantiles of the crop (padding left out), in the same units: how bright the hip is against its whole
#: radiograph, which the network's first GroupNorm divides out of the image itself.
TONE_CROP_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: kVp enters the network as (kVp - KVP_CENTRE) / KVP_SPAN (hip AP radiographs: about 65-95 kVp).
KVP_CENTRE, KVP_SPAN = 80.0, 10.0
_GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
_LEAKY_SLOPE = 0.1  # bonedrr.model.network._block's


@dataclass
class CropGeometry:
    """How a hip crop is cut from a whole radiograph: the shards' crop settings (docs/shards.md).

    Args:
        shape: (rows, cols) of the crop.
        crop_mm: (height, width) of the crop at the detector, mm.
        head_position: Where the femoral-head centre lies in the crop, as fractions of (height, width),
            in the right hip's orientation.
    """

    shape: tuple[int, int]
    crop_mm: tuple[float, float]
    head_position: tuple[float, float]

    @property
    def pack_settings(self):
        """The same crop as :class:`bonedrr.shards.PackSettings` (for :func:`bonedrr.shards.crop_grid`)."""
        from bonedrr.shards import PackSettings

        return PackSettings(crop_mm=self.crop_mm, crop_px=self.shape, head_position=self.head_position)


# ---------------------------------------------------------------------------------------------
# Input scale and heatmap peak (NumPy twins of bonedrr.model.network and bonedrr.model.locator)


def _body_pixels(image: np.ndarray) -> np.ndarray:
    """The pixels of a flat overview that are not air or padding (:data:`AIR_FRACTION`)."""
    bottom, top = image.min(), np.quantile(image, 0.995)
    return image[image > bottom + AIR_FRACTION * (top - bottom)]


def overview_scale(overviews: np.ndarray) -> np.ndarray:
    """(N, 2): the intensities of each whole-radiograph overview (N, ...) that the network's input maps
    to 0 and 1 (:data:`OVERVIEW_PERCENTILES` of the pixels that are not air or padding,
    :data:`AIR_FRACTION`); the torch twin is :func:`bonedrr.model.network.overview_scale`."""
    flat = np.asarray(overviews, np.float32).reshape(len(overviews), -1)
    out = np.empty((len(flat), 2), np.float32)
    for i, image in enumerate(flat):
        body = _body_pixels(image)
        if body.size:
            out[i] = np.quantile(body, [p / 100.0 for p in OVERVIEW_PERCENTILES])
        else:
            out[i] = image.min(), image.max()
    return out


def detector_scale(overviews: np.ndarray, span: float, open_beam: float | None = None) -> np.ndarray:
    """(N, 2): the input scale of raw radiographs read on the detector's own log scale: a low end, and
    that plus ``span`` (one number for every radiograph). The span does not follow the image, so the
    input keeps the absolute attenuation that a per-image span divides out (docs/validation.md, "Raw
    radiographs"). The low end is ``open_beam``, the detector's stored value where nothing attenuates,
    the same for every radiograph; or, without it, each overview's body's first
    :data:`OVERVIEW_PERCENTILES` point, which follows a dose change (it shifts a log image) but also
    moves with what the field holds: whether air is in it, and the thinnest tissue the pose brings in.
    The torch twin is :func:`bonedrr.model.network.detector_scale`.

    Example:
        >>> ov = np.tile(np.linspace(1000.0, 3000.0, 256, dtype=np.float32), (1, 128, 1))
        >>> np.round(detector_scale(ov, 500.0) - detector_scale(ov + 200.0, 500.0), 3).tolist()
        [[-200.0, -200.0]]
        >>> detector_scale(ov + 200.0, 500.0, open_beam=1000.0).tolist()
        [[1000.0, 1500.0]]
    """
    overviews = np.asarray(overviews, np.float32)
    low = overview_scale(overviews)[:, :1] if open_beam is None else np.full((len(overviews), 1), open_beam, np.float32)
    return np.concatenate([low, low + np.float32(span)], 1)


#: How far (a fraction of the input span) a raw radiograph's darkest values may lie below the open beam
#: before :func:`below_open_beam` reports them: a little scatter and noise, not a dose shift.
OPEN_BEAM_TOLERANCE = 0.05


def below_open_beam(image: np.ndarray, open_beam: float, span: float) -> float | None:
    """The darkest values of a radiograph or overview (its 0.1st percentile, exact zeros, the padding, left
    out) where they lie more than :data:`OPEN_BEAM_TOLERANCE` of ``span`` below ``open_beam``, else None.

    Nothing in an image referenced to the open beam is darker than the unattenuated beam, so such values
    mean another dose reference or another detector. (Values above it cannot be told from tissue: a
    field without air shows none.)

    Example:
        >>> image = np.full((4, 4), 1500.0); image[0] = 1001.0
        >>> below_open_beam(image, 1000.0, 2000.0) is None, round(below_open_beam(image - 400, 1000.0, 2000.0))
        (True, 601)
    """
    body = np.asarray(image, np.float32)
    body = body[body != 0]
    if body.size == 0:
        return None
    darkest = float(np.percentile(body, 0.1))
    return darkest if darkest < open_beam - OPEN_BEAM_TOLERANCE * span else None


def body_quantiles(overviews: np.ndarray, quantiles) -> np.ndarray:
    """(N, len(quantiles)) of the pixels of each overview (N, ...) that are not air or padding
    (:data:`AIR_FRACTION`); of all its pixels when none is left. The torch twin is
    :func:`bonedrr.model.network.body_quantiles`."""
    flat = np.asarray(overviews, np.float32).reshape(len(overviews), -1)
    out = np.empty((len(flat), len(quantiles)), np.float32)
    for i, image in enumerate(flat):
        body = _body_pixels(image)
        out[i] = np.quantile(body if body.size else image, quantiles)
    return out


def condition_size(condition: str) -> int:
    """Number of scalars of a network condition (:data:`CONDITIONS`)."""
    return int("kvp" in condition) + ("tone" in condition) * (len(TONE_OVERVIEW_QUANTILES) + len(TONE_CROP_QUANTILES))


def tone_condition(crops: np.ndarray, scale: np.ndarray, overview_quantiles: np.ndarray) -> np.ndarray:
    """(N, 16) ``tone`` condition of crops (N, ...) with their input scale (N, 2) and their radiographs'
    :data:`TONE_OVERVIEW_QUANTILES` (N, 11): those and the crops' :data:`TONE_CROP_QUANTILES`, in the
    network input's units. The torch twin is :func:`bonedrr.model.network.tone_condition`."""
    flat = np.asarray(crops, np.float32).reshape(len(crops), -1)
    crop_q = np.zeros((len(flat), len(TONE_CROP_QUANTILES)), np.float32)
    for i, image in enumerate(flat):
        kept = image[image != 0]
        if kept.size:
            crop_q[i] = np.quantile(kept, TONE_CROP_QUANTILES)
    lo = np.asarray(scale, np.float32)[:, :1]
    span = np.maximum(np.asarray(scale, np.float32)[:, 1:2] - lo, 1e-6)
    return ((np.concatenate([np.asarray(overview_quantiles, np.float32), crop_q], 1) - lo) / span).astype(np.float32)


def robust_range(x: np.ndarray, low: float = 0.01, high: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """Per image of (N, ...): the ``low`` and ``high`` quantiles of its pixels, exact zeros (padding)
    left out; 0 for an image of zeros. The torch twin is :func:`bonedrr.model.network.robust_range`."""
    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    lo, hi = np.zeros(len(flat), np.float32), np.zeros(len(flat), np.float32)
    for i, image in enumerate(flat):
        kept = image[image != 0]
        if kept.size:
            lo[i], hi[i] = np.quantile(kept, [low, high])
    return lo, hi


def peak(logits: np.ndarray, window: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each heatmap (N, 1, H, W): soft-argmax in a window around the maximum; and the
    softmax mass in that window (a confidence, 0..1). The torch twin is :func:`bonedrr.model.locator.peak`."""
    n, _, h, w = logits.shape
    flat = logits.reshape(n, -1).astype(np.float64)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).reshape(n, h, w)
    out, conf = np.zeros((n, 2)), np.zeros(n)
    for i in range(n):
        r, c = divmod(int(prob[i].argmax()), w)
        r0, r1, c0, c1 = max(0, r - window), min(h, r + window + 1), max(0, c - window), min(w, c + window + 1)
        p = prob[i, r0:r1, c0:c1]
        s = p.sum()
        out[i] = (p.sum(1) @ np.arange(r0, r1)) / s, (p.sum(0) @ np.arange(c0, c1)) / s
        conf[i] = s
    return out, conf


def kvp_condition(kvp) -> np.ndarray:
    """(N, 1) network condition of tube voltages ``kvp`` (N,) in kV."""
    return ((np.asarray(kvp, np.float32).reshape(-1, 1) - KVP_CENTRE) / KVP_SPAN).astype(np.float32)


def film_widths(base_channels: int, depth: int) -> list[int]:
    """Channels of the U-Net's FiLM layers: the bottleneck's, then each decoder level's, deepest first."""
    return [base_channels * 2 ** depth] + [base_channels * 2 ** i for i in reversed(range(depth))]


# ---------------------------------------------------------------------------------------------
# The U-Net's layers (torch's semantics: NCHW, float32)


def _conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """torch.nn.Conv2d, stride 1, 'same' zero padding (kernel 3: padding 1; kernel 1: none).

    On the flattened, padded image a kernel offset is a shift, so the patch matrix is k*k contiguous
    slice copies and the convolution one matrix product (4x faster than a product per offset, whose
    inner dimension is only the input channels).
    """
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    p = k // 2
    wp = w + 2 * p
    flat = np.zeros((n, c, (h + 2 * p) * wp + 2 * p), np.float32)  # the tail keeps the last shifts in bounds
    flat[:, :, : (h + 2 * p) * wp].reshape(n, c, h + 2 * p, wp)[:, :, p:p + h, p:p + w] = x
    length = h * wp  # outputs on the padded width; the pad columns are dropped at the end
    patches = np.empty((n, k * k, c, length), np.float32)
    for dy in range(k):
        for dx in range(k):
            shift = dy * wp + dx
            patches[:, dy * k + dx] = flat[:, :, shift:shift + length]
    matrix = weight.transpose(0, 2, 3, 1).reshape(o, k * k * c)
    y = (matrix @ patches.reshape(n, k * k * c, length)).reshape(n, o, h, wp)[..., :w]
    if bias is not None:
        y = y + bias[None, :, None, None]
    return np.ascontiguousarray(y, np.float32)


def _group_norm(x: np.ndarray, groups: int, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1).astype(np.float64)
    g = (g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + _GROUP_NORM_EPS)
    return (g.reshape(n, c, h, w) * weight[None, :, None, None] + bias[None, :, None, None]).astype(np.float32)


def _leaky_relu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, _LEAKY_SLOPE * x)


def _pool(x: np.ndarray, k: int, reduce) -> np.ndarray:
    """k x k pooling, stride k, the remainder rows and columns dropped (torch's floor mode)."""
    n, c, h, w = x.shape
    x = x[:, :, : h // k * k, : w // k * k].reshape(n, c, h // k, k, w // k, k)
    return reduce(x, axis=(3, 5)).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size, mode='bilinear', align_corners=False) of (N, C, H, W)."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    r0, r1, fr = axis(x.shape[2], size[0])
    c0, c1, fc = axis(x.shape[3], size[1])
    rows = x[:, :, r0] * (1 - fr)[:, None] + x[:, :, r1] * fr[:, None]
    return (rows[..., c0] * (1 - fc) + rows[..., c1] * fc).astype(np.float32)


def _block(weights: dict, name: str, x: np.ndarray) -> np.ndarray:
    """bonedrr.model.network._block: (conv 3x3, GroupNorm, LeakyReLU) twice."""
    for j in (0, 3):
        w = weights[f"{name}.{j}.weight"]
        x = _conv2d(x, w)
        cout = w.shape[0]
        x = _leaky_relu(_group_norm(x, max(1, min(8, cout // 4)), weights[f"{name}.{j + 1}.weight"],
                                    weights[f"{name}.{j + 1}.bias"]))
    return x


def _film(weights: dict, level: int, x: np.ndarray, condition: np.ndarray | None) -> np.ndarray:
    """bonedrr.model.network.UNet._modulate: x * (1 + gamma) + beta, (gamma, beta) linear in the condition."""
    if f"film.{level}.weight" not in weights:
        return x
    out = condition @ weights[f"film.{level}.weight"].T + weights[f"film.{level}.bias"]
    gamma, beta = np.split(out.astype(np.float32), 2, axis=1)
    return (x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]).astype(np.float32)


def unet_forward(weights: dict[str, np.ndarray], x: np.ndarray, depth: int, scale: np.ndarray | None = None,
                 normalise: bool = True, condition: np.ndarray | None = None) -> np.ndarray:
    """:class:`bonedrr.model.network.UNet`'s forward pass from its ``state_dict`` (as NumPy arrays).

    Args:
        weights: The U-Net's state dict, keys as torch names them (``down.0.0.weight``, ...).
        x: (N, C, H, W) as stored (H, W divisible by 2**depth).
        depth: The U-Net's number of down-sampling steps.
        scale: (N, 2) intensities mapped to 0 and 1, or None for each image's own 1st-99th percentile.
        normalise: Whether the U-Net normalises its input (:class:`bonedrr.model.network.RobustNormalise`).
        condition: (N, conditions) for a U-Net with FiLM layers (:func:`kvp_condition`).
    """
    if "film.0.weight" in weights and condition is None:
        raise BonedrrError("this U-Net is conditioned (FiLM layers): give its condition")
    x = np.asarray(x, np.float32)
    contrast = input_contrast(x, scale) if "equivariant" in weights else None
    if normalise:
        lo, hi = (scale[:, 0], scale[:, 1]) if scale is not None else robust_range(x)
        lo = np.asarray(lo, np.float32).reshape(-1, 1, 1, 1)
        span = np.maximum(np.asarray(hi, np.float32).reshape(-1, 1, 1, 1) - lo, 1e-6)
        x = (x - lo) / span
    skips = []
    for i in range(depth + 1):
        x = _block(weights, f"down.{i}", x if i == 0 else _pool(x, 2, np.max))
        skips.append(x)
    x = _film(weights, 0, skips.pop(), condition)
    for i in range(depth):
        skip = skips.pop()
        x = resize_bilinear(x, skip.shape[-2:])
        x = _film(weights, i + 1, _block(weights, f"up.{i}", np.concatenate([x, skip], 1)), condition)
    out = _conv2d(x, weights["head.weight"], weights["head.bias"])
    if contrast is None:
        return out
    flags = np.asarray(weights["equivariant"], np.float32).reshape(1, -1, 1, 1)  # every channel, or one flag each
    return (out * (contrast.reshape(-1, 1, 1, 1) * flags + (1 - flags))).astype(np.float32)


def input_contrast(x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """(N,): each crop's (N, ...) mean as the network's input gets it (padding left out; ``scale`` (N, 2)
    or None: the crop's own 1st-99th percentile), by which an ``equivariant`` U-Net multiplies its
    output; the torch twin is :func:`bonedrr.model.network.input_contrast`."""
    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    if scale is None:
        lo, hi = robust_range(flat)
    else:
        lo, hi = np.asarray(scale, np.float32)[:, 0], np.asarray(scale, np.float32)[:, 1]
    kept = flat != 0
    mean = (flat * kept).sum(1) / np.maximum(kept.sum(1), 1)
    return np.maximum((mean - lo) / np.maximum(hi - lo, 1e-6), 1e-3).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The model


class HipModel:
    """What every trained model does without its networks: the channels, the crop geometry, the input
    scale, BMD, the DXA calibration and the search for both hips. Subclasses run the networks:
    :meth:`predict` and :meth:`_locate`.

    Args:
        stage_channels: The channels each stage predicts.
        crop: The crop geometry of the training data.
        calibration: ``{"slope", "intercept"}`` of DXA aBMD against predicted DRR-BMD, or None.
        info: Training facts (settings, folds, samples), kept in ``model.pt``.
    """

    def __init__(self, stage_channels: list[list[str]], crop: CropGeometry, calibration: dict | None = None,
                 info: dict | None = None):
        self.stage_channels = [list(c) for c in stage_channels]
        self.crop = crop
        self.calibration = calibration
        self.info = info or {}
        # models saved before input_scale existed scaled each crop by itself
        self.input_scale = self.info.get("settings", {}).get("input_scale", "crop")
        self.input_span = self.info.get("settings", {}).get("input_span")
        self.open_beam = self.info.get("settings", {}).get("open_beam")
        self.condition = self.info.get("settings", {}).get("condition", "none")
        # channel -> (stage, index in its output); a later stage wins a duplicate
        self._source: dict[str, tuple[int, int]] = {}
        for s, chans in enumerate(self.stage_channels):
            for i, c in enumerate(chans):
                self._source.pop(c, None)
                self._source[c] = (s, i)

    @property
    def channels(self) -> list[str]:
        """Output channels of :meth:`predict`, in order."""
        return list(self._source)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(rows, cols) of the crops the model was trained on."""
        return tuple(self.crop.shape)

    @property
    def has_locator(self) -> bool:
        raise NotImplementedError

    @property
    def needs_kvp(self) -> bool:
        """Whether :meth:`predict` needs each radiograph's tube voltage (the model is conditioned on it)."""
        return "kvp" in self.condition

    def predict(self, xray_crops: np.ndarray, scale: np.ndarray | None = None, batch_size: int = 16,
                kvp=None) -> np.ndarray:
        """Decompose radiograph crops (N, H, W) as stored in the shards -> (N, C, H, W) g/cm2 (>= 0).

        Crops of another size are resized to :attr:`crop_shape` and the output back.

        Args:
            xray_crops: (N, H, W) or (H, W).
            scale: (N, k) or (k,): each crop's input scale from its whole radiograph (:meth:`scale_of`;
                k = 2, or 13 for a ``tone``-conditioned model); required unless the model's
                ``input_scale`` is ``crop``.
            batch_size: Crops per forward pass.
            kvp: (N,) or one number: each crop's tube voltage (kV, DICOM KVP); required when
                :attr:`needs_kvp`, ignored otherwise.

        Raises:
            BonedrrError: No scale, or no (or a non-finite) kVp, for a model that needs it.
        """
        raise NotImplementedError

    def _locate(self, overview: np.ndarray) -> tuple[tuple[float, float], float]:
        """The locator on one overview (h, w): the femoral-head centre (row, col) in overview pixels
        and the confidence."""
        raise NotImplementedError

    def _inputs(self, xray_crops, scale, kvp) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`predict`'s inputs checked: crops (N, H, W) float32, scale (N, 2) or None, and the
        network condition (N, conditions) or None."""
        x = np.asarray(xray_crops, np.float32)
        if x.ndim == 2:
            x = x[None]
        parts = []
        if self.needs_kvp:
            values = np.asarray(kvp if kvp is not None else np.nan, np.float64).reshape(-1)
            if not np.isfinite(values).all():
                raise BonedrrError("this model is conditioned on the tube voltage: give each radiograph's kVp "
                                   "(its DICOM KVP tag, or --kvp for a file without it)")
            parts.append(kvp_condition(np.broadcast_to(values, (len(x),))))
        if self.input_scale == "crop":
            return x, None, (np.concatenate(parts, 1) if parts else None)
        width = 2 + len(TONE_OVERVIEW_QUANTILES) * ("tone" in self.condition)
        if scale is None or np.shape(scale)[-1] != width:
            raise BonedrrError(f"this model scales its input by the whole radiograph: give predict() the {width} "
                               "statistics of each crop's radiograph (DecompositionModel.scale_of)")
        scale = np.array(np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, width), (len(x), width)))
        if "tone" in self.condition:
            parts.append(tone_condition(x, scale[:, :2], scale[:, 2:]))
        return x, scale[:, :2], (np.concatenate(parts, 1) if parts else None)

    def scale_of(self, overviews) -> np.ndarray | None:
        """The input scale (N, 2) of crops from whole radiographs with these overviews (N, h, w) (the
        shards' ``overview``, or :meth:`overview_of`), followed for a ``tone``-conditioned model by the
        overviews' :data:`TONE_OVERVIEW_QUANTILES` (N, 2 + 11); None for a model that scales each crop
        by itself."""
        if self.input_scale == "crop":
            return None
        overviews = np.asarray(overviews, np.float32)
        scale = detector_scale(overviews, self.input_span, self.open_beam) if self.input_scale == "detector" \
            else overview_scale(overviews)
        if "tone" in self.condition:
            return np.concatenate([scale, body_quantiles(overviews, TONE_OVERVIEW_QUANTILES)], 1)
        return scale

    def overview_of(self, radiograph: np.ndarray, pixel_mm=(1.0, 1.0)) -> np.ndarray:
        """A whole radiograph's overview (128 x 256), as the shards store it (right hip's orientation)."""
        from bonedrr.shards import overview_grid, resample

        grid = overview_grid(np.shape(radiograph), pixel_mm, "right")
        return resample(np.asarray(radiograph, np.float32), grid["rows"], grid["cols"], grid["zoom"])

    def bmd(self, prediction: np.ndarray, threshold_g_cm2: float | None = None) -> np.ndarray:
        """DRR-BMD (g/cm2) of each predicted sample (N, C, H, W), exactly as from a true DRR."""
        threshold = threshold_g_cm2 if threshold_g_cm2 is not None else self.info.get("threshold_g_cm2",
                                                                                       BMD_THRESHOLD_G_CM2)
        k = self.channels.index(BMD_CHANNEL)
        return np.array([drr_bmd(p[k], threshold) for p in prediction], float)

    def vbmd(self, prediction: np.ndarray, threshold_g_cm2: float | None = None) -> np.ndarray | None:
        """DRR-vBMD (mg/cm3) of each predicted sample (:func:`bonedrr.bmd.drr_vbmd`), or None for a model
        that does not predict the proximal femur's thickness."""
        threshold = threshold_g_cm2 if threshold_g_cm2 is not None else self.info.get("threshold_g_cm2",
                                                                                       BMD_THRESHOLD_G_CM2)
        return drr_vbmd_of(self.channels, prediction, threshold)

    def calibrated(self, drr_bmd_g_cm2):
        """DXA-equivalent aBMD from DRR-BMD with the fitted calibration (None without one)."""
        if not self.calibration:
            return None
        return self.calibration["slope"] * np.asarray(drr_bmd_g_cm2, float) + self.calibration["intercept"]

    def locate_hips(self, radiograph: np.ndarray, pixel_mm=(1.0, 1.0)) -> dict[str, tuple[float, float]]:
        """Femoral-head centres (row, col, radiograph pixels) of an AP pelvis radiograph, per side:
        ``{"right": (r, c), "left": (r, c)}``.

        The right hip is sought in the image as displayed (patient's right on the viewer's left, the
        shards' orientation), the left hip in its mirror. ``pixel_mm`` (row, col spacing) matters only
        for non-square pixels (the overview keeps the physical aspect).

        Raises:
            BonedrrError: The model has no locator (trained with ``locator.epochs: 0``).
        """
        return self.locate_hips_with_confidence(radiograph, pixel_mm)[0]

    def locate_hips_with_confidence(self, radiograph: np.ndarray, pixel_mm=(1.0, 1.0)) -> tuple[dict, dict]:
        """:meth:`locate_hips` and, per side, a confidence (0..1: the heatmap's mass near its peak).

        Raises:
            BonedrrError: The model has no locator (trained with ``locator.epochs: 0``).
        """
        from bonedrr.shards import overview_grid, resample

        if not self.has_locator:
            raise BonedrrError("this model has no hip locator (trained with locator epochs 0); give a hip crop")
        image = np.asarray(radiograph, np.float32)
        found, confidence = {}, {}
        for side in ("right", "left"):
            grid = overview_grid(image.shape, pixel_mm, side)
            (r, c), conf = self._locate(resample(image, grid["rows"], grid["cols"], grid["zoom"]))
            found[side] = tuple(float(np.interp(v, np.arange(len(g)), g, left=np.nan, right=np.nan))
                                for v, g in zip((r, c), (grid["rows"], grid["cols"])))
            confidence[side] = float(conf)
        return found, confidence

    def _meta(self) -> dict:
        """The model's facts as saved (JSON)."""
        from dataclasses import asdict

        return {"stage_channels": self.stage_channels, "crop": asdict(self.crop), "calibration": self.calibration,
                "info": self.info}


class PortableModel(HipModel):
    """A trained model run in NumPy from its ``model.npz`` (:func:`load_portable`); on a CPU it predicts
    what :class:`bonedrr.train.DecompositionModel` predicts, to float32 rounding.

    Args:
        stage_weights: Each stage U-Net's state dict as NumPy arrays.
        locator_weights: The locator U-Net's state dict (keys without the ``net.`` prefix), or None.
        stage_channels, crop, calibration, info: As for :class:`HipModel`.
    """

    def __init__(self, stage_weights: list[dict], stage_channels: list[list[str]], crop: CropGeometry,
                 locator_weights: dict | None = None, calibration: dict | None = None, info: dict | None = None):
        super().__init__(stage_channels, crop, calibration, info)
        self.stage_weights = stage_weights
        self.locator_weights = locator_weights
        self.depth = int(self.info.get("settings", {}).get("depth", 3))
        self.locator_depth, self.locator_pool = 3, 2  # bonedrr.model.locator.Locator's defaults, as trained

    @property
    def has_locator(self) -> bool:
        return self.locator_weights is not None

    def predict(self, xray_crops: np.ndarray, scale: np.ndarray | None = None, batch_size: int = 16,
                kvp=None) -> np.ndarray:
        x, scale, condition = self._inputs(xray_crops, scale, kvp)
        out = []
        for i in range(0, len(x), batch_size):
            t = x[i:i + batch_size, None]
            sc = scale[i:i + batch_size] if scale is not None else None
            cond = condition[i:i + batch_size] if condition is not None else None
            size = t.shape[-2:]
            if tuple(size) != self.crop_shape:
                t = resize_bilinear(t, self.crop_shape)
            stage_out = [unet_forward(w, t, self.depth, sc, condition=cond) for w in self.stage_weights]
            y = np.maximum(np.stack([stage_out[s][:, j] for s, j in self._source.values()], 1), 0)
            if tuple(size) != self.crop_shape:
                y = resize_bilinear(y, tuple(size))
            out.append(y)
        return np.concatenate(out).astype(np.float32)

    def _locate(self, overview: np.ndarray) -> tuple[tuple[float, float], float]:
        pooled = _pool(np.asarray(overview, np.float32)[None, None], self.locator_pool, np.mean)
        rc, conf = peak(unet_forward(self.locator_weights, pooled, self.locator_depth))
        r, c = ((v + 0.5) * self.locator_pool - 0.5 for v in rc[0])  # Locator.to_overview
        return (float(r), float(c)), float(conf[0])


def write_portable(path: str | Path, model: HipModel, stage_states: list[dict], locator_state: dict | None,
                   twin_of: str | None = None) -> None:
    """Write ``model.npz``: the weights (state dicts as NumPy arrays) and the model's facts (JSON).

    Args:
        path: The file to write (atomically).
        model: The model whose facts are written.
        stage_states: Each stage U-Net's state dict, arrays.
        locator_state: The locator network's state dict (its U-Net's keys), or None.
        twin_of: :func:`torch_file_digest` of the ``model.pt`` written beside it, kept in its facts so
            that :func:`portable_path` knows its twin by content (a workflow manager touches outputs).
    """
    from bonedrr.images import atomic_path

    arrays = {"meta": np.array(json.dumps({**model._meta(), **({"model_pt_digest": twin_of} if twin_of else {})}))}
    for s, state in enumerate(stage_states):
        arrays.update({f"stage{s}/{k}": np.asarray(v) for k, v in state.items()})
    for k, v in (locator_state or {}).items():
        arrays[f"locator/{k}"] = np.asarray(v)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def torch_file_digest(path: str | Path) -> str | None:
    """A SHA-256 of what a ``torch.save`` file holds, the same for two saves of the same model: over its
    zip records by their names within the archive, leaving out the archive's folder (the name the file
    was written under) and ``.data/serialization_id`` (torch draws a new one at every save). None for a
    file that is not a torch zip archive. Read with the standard library: no torch."""
    import hashlib
    import zipfile

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            records = sorted((info.filename.split("/", 1)[-1], info) for info in archive.infolist())
            for name, info in records:
                if name != ".data/serialization_id":
                    digest.update(name.encode() + b"\0" + archive.read(info))
    except (OSError, zipfile.BadZipFile):
        return None
    return digest.hexdigest()


def portable_path(model_dir: str | Path) -> Path | None:
    """The model folder's ``model.npz`` when it is there and the twin of its ``model.pt``, else None.

    A copy written since 2026-11-27 names its ``model.pt`` by :func:`torch_file_digest`: a ``model.pt``
    replaced after it makes it stale, one only touched (Snakemake touches a job's outputs when it ends;
    ``cp`` without ``-p`` restamps them) does not. An older copy is stale when its ``model.pt`` is newer."""
    model_dir = Path(model_dir)
    folder = model_dir.parent if model_dir.is_file() else model_dir
    npz, pt = folder / PORTABLE_FILE, folder / "model.pt"
    if not npz.is_file():
        return None
    if not pt.is_file():
        return npz
    try:
        with np.load(npz, allow_pickle=False) as data:
            twin_of = json.loads(str(data["meta"])).get("model_pt_digest")
    except Exception:
        return npz  # damaged: load_portable says so, naming the file
    if twin_of is not None:
        return npz if torch_file_digest(pt) == twin_of else None
    return None if pt.stat().st_mtime_ns > npz.stat().st_mtime_ns else npz


def load_portable(path: str | Path) -> PortableModel:
    """Load a ``model.npz`` (:func:`write_portable`).

    Raises:
        InputError: A file that is not a bonedrr portable model.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:
        raise InputError(f"not a bonedrr portable model ({type(e).__name__})", path) from e
    stages: list[dict] = [{} for _ in meta["stage_channels"]]
    locator: dict = {}
    for key, value in arrays.items():
        group, name = key.split("/", 1)
        if group == "locator":
            locator[name.removeprefix("net.")] = value
        else:
            stages[int(group.removeprefix("stage"))][name] = value
    c = meta["crop"]
    crop = CropGeometry(tuple(c["shape"]), tuple(c["crop_mm"]), tuple(c["head_position"]))
    return PortableModel(stages, meta["stage_channels"], crop, locator or None, meta["calibration"], meta["info"])
