"""The ``validate`` stage: BMD from held-out radiographs, against every ground truth, with a baseline.

For each fold k that has a model (``results/models/<cohort>_fold<k>``, trained without fold k), the
held-out samples of fold k are decomposed and their BMD read off the predicted proximal-femur DRR
exactly as from the true one (:func:`bonedrr.bmd.drr_bmd`). Each sample is predicted once, by the
model that never saw its patient (the folds are patient-disjoint), and the metrics pool all held-out
folds.

Ground truths (per hip): the DRR-BMD of the true DRR (g/cm2), the QCT vBMD of the proximal femur
(mg/cm3) and DXA total-hip aBMD (g/cm2), where known. The predicted DRR-BMD is compared with the
DRR-BMD as it is; against QCT and DXA, whose units or regions differ, a prediction is first mapped by
a line fitted on the *training* folds of the same model (the fold's own model predicting its training
samples), never on held-out data. Against DXA that prediction is DRR-BMD (both are areal). Against QCT
it is the predicted DRR-vBMD (:func:`bonedrr.bmd.drr_vbmd`: the proximal femur's mineral over its
volume, from the predicted proximal-femur and thickness channels) when the model predicts the
thickness, as QCT measures a volumetric density and DRR-BMD also grows with the bone's thickness;
else DRR-BMD. metrics.json says which (``qct_readout``) and reports the DRR-BMD line against QCT
beside it (``qct_from_drr_bmd``).

The baseline is the conventional approach the paper improves on: BMD regressed linearly on the mean
radiograph intensity in the same region, the proximal femur's projected bone area (the true mask: a
favour to the baseline, which in practice would need a segmentation), on the model's input scale (the
whole radiograph's, :func:`bonedrr.model.network.overview_scale`; :func:`roi_intensity`), fitted on the
training folds per ground truth.

Robustness:

* **JPEG**: each held-out hip's whole radiograph (``results/<cohort>/<case>/xray.nii.gz``) is mapped
  linearly to 8 bits, JPEG-encoded with Pillow at decreasing quality, decoded, mapped back, and cut
  exactly as the shards were (:func:`bonedrr.shards.crop_grid`); then predicted again. The
  compression ratio is the uncompressed 8-bit size (rows x cols bytes) over the JPEG file's size
  (the usual definition: 8 / bits per pixel); the ratio to the 8-bit PNG (lossless) size is recorded
  too. Besides the fixed qualities, the sweep compresses each radiograph to a given ratio (by default
  1/50 of its size, issue 7's target): at the highest quality whose JPEG is at least that many times
  smaller (:func:`quality_for_ratio`), since a fixed quality compresses each image by its own ratio.
* **Multi-pose repeatability** (demo cohorts with ``extra_views``): every radiograph of a held-out
  patient (the case's own and its ``views/``) goes through what ``bonedrr estimate`` does (read the
  file, locate the hips with the model's locator, crop, decompose); the root-mean-square coefficient of
  variation of BMD over each hip's radiographs is reported (Gluer et al. 1995), with the hips located
  by the model and, to separate the locator's share, at their true projected centres.

Metrics are those of :mod:`bonedrr.metrics` (ICC(2,1) reported; T-scores against NHANES III,
classification only against DXA). Outputs in ``results/validation/<cohort>/``: ``predictions.csv``
(one row per held-out hip), ``jpeg.csv`` and ``pose.csv`` (the sweeps' rows), ``metrics.json``,
``plots/*.png``, ``report.html`` (self-contained; sample ids are pseudonymous case
ids, nothing from a DICOM header).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonedrr import metrics
from bonedrr.bmd import BMD_CHANNEL, BMD_THRESHOLD_G_CM2, THICKNESS_CHANNEL, drr_bmd, drr_vbmd_of
from bonedrr.errors import BonedrrError, InputError
from bonedrr.images import atomic_path, write_json

log = logging.getLogger("bonedrr.validate")

#: Ground truths: sample key -> (label, unit).
TRUTHS = {"drr_bmd": ("DRR-BMD", "g/cm2"), "qct_vbmd": ("QCT vBMD", "mg/cm3"), "dxa_abmd": ("DXA aBMD", "g/cm2")}
DEFAULT_QUALITIES = (95, 75, 50, 30, 20, 10, 5, 3, 1)
#: Issue 7's targets on the demo cohort (checked and reported in metrics.json).
TARGETS = {"pearson_r": 0.95, "icc_2_1": 0.9, "jpeg_ratio": 50.0, "jpeg_max_r_drop": 0.02, "pose_rms_cv": 0.03}


@dataclass
class ValidationSettings:
    """Config ``validate`` (documented in config/README.md).

    Args:
        threshold_g_cm2: Projected-bone threshold of DRR-BMD (config ``bmd.threshold_g_cm2``).
        jpeg_qualities: Pillow JPEG qualities of the compression sweep (empty: none).
        jpeg_ratios: Compression ratios of the sweep, each radiograph at the highest quality reaching the
            ratio (:func:`quality_for_ratio`; empty: none). The JPEG target is checked at ``50``.
        examples: Example decompositions shown in the report.
        device: Where the models run (``auto``, ``cpu``, ``cuda``).
    """

    threshold_g_cm2: float = BMD_THRESHOLD_G_CM2
    jpeg_qualities: tuple[int, ...] = DEFAULT_QUALITIES
    jpeg_ratios: tuple[float, ...] = (TARGETS["jpeg_ratio"],)
    examples: int = 4
    device: str = "cpu"

    def __post_init__(self):
        self.jpeg_qualities = tuple(int(q) for q in self.jpeg_qualities)
        self.jpeg_ratios = tuple(float(r) for r in self.jpeg_ratios)
        if any(not 1 <= q <= 100 for q in self.jpeg_qualities):
            raise BonedrrError(f"validate jpeg_qualities must be Pillow qualities 1-100, not {list(self.jpeg_qualities)}")
        if any(not r > 1 for r in self.jpeg_ratios):
            raise BonedrrError("validate jpeg_ratios must be compression ratios above 1 (8-bit size / JPEG size), "
                               f"not {list(self.jpeg_ratios)}")


def fold_of_model(model_dir: str | Path) -> int:
    """The held-out fold of a model folder named ``<anything>_fold<k>`` (the workflow's naming)."""
    m = re.search(r"fold(\d+)$", Path(model_dir).name.rstrip("/"))
    if not m:
        raise InputError("a validation model folder must be named <cohort>_fold<k> (k: its held-out fold)", model_dir)
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Samples and predictions


def load_samples(dataset, channels: list[str] | None = None) -> dict:
    """All items of a :class:`bonedrr.dataset.ShardDataset` as stacked arrays (and the index fields)."""
    items = [dataset[i] for i in range(len(dataset))]
    out = {"xray": np.stack([it["xray"][0].numpy() for it in items]) if items else np.zeros((0, 1, 1), np.float32),
           "drr": np.stack([it["drr"].numpy() for it in items]) if items else None,
           "mask": np.stack([it["mask"][0].numpy() for it in items]) if items else None,
           "overview": np.stack([it["overview"][0].numpy() for it in items]) if items else None}
    for key in ("drr_bmd", "qct_vbmd", "dxa_abmd", "kvp"):
        out[key] = np.array([it[key] for it in items], float)
    for key in ("sample_id", "patient_id", "fold"):
        out[key] = [it[key] for it in items]
    out["case_id"] = [row["case_id"] for row in dataset.index]
    out["side"] = [row["side"] for row in dataset.index]
    out["channels"] = list(dataset.channels)
    return out


def predicted_bmd(model, xray: np.ndarray, threshold: float, overview=None, kvp=None) -> tuple[np.ndarray, np.ndarray]:
    """(DRR-BMD of each predicted proximal-femur channel, the predictions (N, C, H, W)).

    ``overview``: the crops' whole-radiograph overviews (N, h, w), or one radiograph's (h, w) for
    all, for a model whose input scale comes from them (``DecompositionModel.scale_of``). ``kvp``: the
    crops' tube voltages (N,) or one for all, for a model conditioned on it."""
    if len(xray) == 0:
        return np.zeros(0), np.zeros((0, len(model.channels), 1, 1), np.float32)
    scale = None
    if overview is not None:
        overview = np.asarray(overview, np.float32)
        scale = model.scale_of(overview if overview.ndim == 3 else overview[None])
    pred = model.predict(np.asarray(xray, np.float32), scale, kvp=kvp)
    k = list(model.channels).index(BMD_CHANNEL)
    return np.array([drr_bmd(p[k], threshold) for p in pred], float), pred


def roi_intensity(xray: np.ndarray, mask: np.ndarray, overview: np.ndarray | None = None) -> np.ndarray:
    """The baseline's feature: mean radiograph value inside the proximal femur's projected area, on the
    scale the model's input gets, so DICOM, PNG and JPEG files of any bit depth are comparable: the
    whole radiograph's (``overview`` (N, h, w), :func:`bonedrr.model.network.overview_scale`), or
    without overviews the crop's own (1st percentile -> 0, 99th -> 1)."""
    import torch

    from bonedrr.model.network import overview_scale

    if overview is not None:
        scales = overview_scale(torch.from_numpy(np.asarray(overview, np.float32))).numpy()
    out = np.full(len(xray), np.nan)
    for i, (x, m) in enumerate(zip(xray, mask)):
        lo, hi = scales[i] if overview is not None else np.percentile(x, [1, 99])
        if (m > 0.5).any() and hi > lo:
            out[i] = float((x[m > 0.5].mean() - lo) / (hi - lo))
    return out


def fit_calibrations(x_train: np.ndarray, train: dict) -> dict:
    """Per ground truth, the line ``truth = slope * x + intercept`` fitted on training samples (None
    where fewer than 2 training samples with distinct ``x`` have that truth)."""
    fits = {}
    for key in TRUTHS:
        y = train[key]
        ok = np.isfinite(x_train) & np.isfinite(y)
        if ok.sum() < 2 or np.ptp(x_train[ok]) == 0:
            fits[key] = None
            continue
        slope, intercept = metrics.fit_line(x_train[ok], y[ok])
        fits[key] = {"slope": slope, "intercept": intercept, "n": int(ok.sum())}
    return fits


def apply_line(fit: dict | None, x: np.ndarray) -> np.ndarray:
    return np.full(len(x), np.nan) if fit is None else fit["slope"] * np.asarray(x, float) + fit["intercept"]


def in_truth_units(x: np.ndarray, fits: dict, key: str, identity_for_drr: bool,
                   vbmd: np.ndarray | None = None) -> np.ndarray:
    """A prediction on the DRR-BMD scale (``x``) expressed against ground truth ``key``: as it is for
    DRR-BMD (when ``identity_for_drr``), else through the training-fold line; against QCT, the line from
    ``vbmd`` (DRR-vBMD) where given (``fits["qct_vbmd"]`` is then fitted on DRR-vBMD)."""
    if key == "drr_bmd" and identity_for_drr:
        return np.asarray(x, float)
    return apply_line(fits.get(key), vbmd if key == "qct_vbmd" and vbmd is not None else x)


def fit_readouts(bmd_train: np.ndarray, vbmd_train: np.ndarray | None, train: dict) -> tuple[dict, dict | None]:
    """(the lines of :func:`fit_calibrations`, QCT's from DRR-vBMD where given; the DRR-BMD line to QCT
    when QCT is read from DRR-vBMD, else None)."""
    fits = fit_calibrations(bmd_train, train)
    if vbmd_train is None:
        return fits, None
    return {**fits, "qct_vbmd": fit_calibrations(vbmd_train, train)["qct_vbmd"]}, fits["qct_vbmd"]


def image_metrics(pred: np.ndarray, true: np.ndarray, pred_channels: list[str], true_channels: list[str]) -> dict:
    """PSNR and SSIM per shared channel and sample: ``{channel: {"psnr_db": [...], "ssim": [...]}}``.
    Data range: the true image's maximum (:mod:`bonedrr.metrics`)."""
    out = {}
    for c in pred_channels:
        if c not in true_channels:
            continue
        i, j = pred_channels.index(c), true_channels.index(c)
        ps, ss = [], []
        for p, t in zip(pred[:, i], true[:, j]):
            if t.max() <= 0:
                ps.append(math.nan), ss.append(math.nan)
                continue
            ps.append(metrics.psnr(p, t)), ss.append(metrics.ssim(p, t))
        out[c] = {"psnr_db": ps, "ssim": ss}
    return out


# ---------------------------------------------------------------------------------------------
# JPEG


def jpeg_roundtrip(image: np.ndarray, quality: int) -> tuple[np.ndarray, dict]:
    """``image`` mapped linearly to 8 bits, JPEG-encoded at ``quality``, decoded and mapped back.

    Returns:
        (the decoded image in the input's scale, ``{"jpeg_bytes", "png_bytes", "ratio_raw8",
        "ratio_png"}``): sizes of the JPEG and of the lossless 8-bit PNG, and the compression ratios
        (uncompressed 8-bit size over the JPEG's; PNG size over the JPEG's).

    Example:
        >>> img = np.add.outer(np.arange(64.0), np.arange(96.0))
        >>> out, size = jpeg_roundtrip(img, 90)
        >>> bool(np.abs(out - img).max() < 2.0), size["ratio_raw8"] > 5
        (True, True)
    """
    from PIL import Image

    u8, lo, scale = _to_8bit(image)
    jpg, png = _encoded(u8, "JPEG", quality), _encoded(u8, "PNG")
    decoded = np.asarray(Image.open(io.BytesIO(jpg)), np.float64)
    return (decoded * scale + lo).astype(np.float32), {"jpeg_bytes": len(jpg), "png_bytes": len(png),
                                                       "ratio_raw8": u8.size / len(jpg), "ratio_png": len(png) / len(jpg)}


def quality_for_ratio(image: np.ndarray, ratio: float) -> int:
    """The highest Pillow quality (1-95) at which :func:`jpeg_roundtrip` compresses ``image`` at least
    ``ratio`` times; 1 where none does (its ratio, recorded with the sweep, then falls short). Found by
    bisection, which assumes the JPEG grows with the quality; where a step breaks that, the quality
    returned still reaches ``ratio``, though a higher one might too.

    Example:
        >>> img = np.add.outer(np.arange(64.0), np.arange(96.0)) + np.random.default_rng(0).normal(0, 4, (64, 96))
        >>> q = quality_for_ratio(img, 20)
        >>> jpeg_roundtrip(img, q)[1]["ratio_raw8"] >= 20 > jpeg_roundtrip(img, q + 1)[1]["ratio_raw8"]
        True
    """
    u8, _, _ = _to_8bit(image)
    reaches = {}  # the JPEG's size does not fall strictly with the quality: search, then confirm below

    def ok(q: int) -> bool:
        if q not in reaches:
            reaches[q] = u8.size / len(_encoded(u8, "JPEG", q)) >= ratio
        return reaches[q]

    lo, hi = 1, 95
    while lo < hi:  # the highest q with ok(q), where ok falls with q
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    while lo > 1 and not ok(lo):
        lo -= 1
    return lo


def _to_8bit(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``image`` mapped linearly (its min to max) to 0-255: (uint8 image, offset, step)."""
    a = np.asarray(image, np.float64)
    lo, hi = float(a.min()), float(a.max())
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return np.clip(np.round((a - lo) / scale), 0, 255).astype(np.uint8), lo, scale


def _encoded(u8: np.ndarray, kind: str, quality: int | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if kind == "JPEG":
        Image.fromarray(u8).save(buffer, "JPEG", quality=int(quality), optimize=True)
    else:
        Image.fromarray(u8).save(buffer, kind, optimize=True)
    return buffer.getvalue()


def _pack_settings(shard_dir: Path):
    from bonedrr.shards import PackSettings

    path = shard_dir / "manifest.json"
    if not path.is_file():
        raise InputError("no manifest.json: not a packed shard folder (or its pack did not finish)", shard_dir)
    manifest = json.loads(path.read_text())
    s = dict(manifest["settings"])
    s["channels"] = tuple(s.get("channels", ()))
    return PackSettings(**s)


def recrop(radiograph: np.ndarray, pixel_mm, head_px, side: str, pack) -> np.ndarray:
    """The hip crop of a whole radiograph, cut exactly as ``bonedrr pack`` cut the shards."""
    from bonedrr.shards import crop_grid, resample

    grid = crop_grid(head_px, side, pixel_mm, pack)
    return resample(np.asarray(radiograph, np.float32), grid["rows"], grid["cols"], grid["zoom"])


def _case_radiograph(case_dir: Path) -> tuple[np.ndarray, tuple[float, float], dict]:
    """A case's ingested radiograph, its (row, col) pixel size and its bmd.json record."""
    import SimpleITK as sitk

    from bonedrr.images import read_volume

    image = read_volume(case_dir / "xray.nii.gz")
    pixels = sitk.GetArrayFromImage(image).astype(np.float32)
    pixels = pixels.reshape(pixels.shape[-2:])
    spacing = image.GetSpacing()
    bmd_path = case_dir / "bmd.json"
    if not bmd_path.is_file():
        raise InputError("no bmd.json (the bmd stage has not run)", case_dir)
    return pixels, (float(spacing[1]), float(spacing[0])), json.loads(bmd_path.read_text())


def jpeg_sweep(model, held_out: dict, cases_root: Path, pack, qualities, threshold: float,
               ratios=()) -> list[dict]:
    """Per held-out sample and sweep point (each of ``qualities``, then each of ``ratios`` at the
    radiograph's :func:`quality_for_ratio`): the predicted DRR-BMD (and DRR-vBMD, NaN
    without a thickness channel) after JPEG, and the file sizes.
    ``target_ratio`` is the ratio a row was compressed to (None: a fixed quality)."""
    rows = []
    cache: dict = {}
    for i, (case, side) in enumerate(zip(held_out["case_id"], held_out["side"])):
        if case not in cache:
            image = _case_radiograph(cases_root / case)
            cache[case] = (*image, [(int(q), None) for q in qualities]
                           + [(quality_for_ratio(image[0], r), float(r)) for r in ratios])
        image, pixel_mm, bmd, points = cache[case]
        head = bmd["sides"][side]["femoral_head_px"]
        crops, overviews, sizes = [], [], []
        for q, _ in points:
            decoded, size = jpeg_roundtrip(image, q)
            crops.append(recrop(decoded, pixel_mm, head, side, pack))
            overviews.append(model.overview_of(decoded, pixel_mm))
            sizes.append(size)
        values, pred = predicted_bmd(model, np.stack(crops), threshold, np.stack(overviews), held_out["kvp"][i])
        vbmd = drr_vbmd_of(model.channels, pred, threshold)
        for j, ((q, ratio), v, size) in enumerate(zip(points, values, sizes)):
            rows.append({"sample_index": i, "quality": q, "target_ratio": ratio, "pred_drr_bmd": float(v),
                         "pred_drr_vbmd": float(vbmd[j]) if vbmd is not None else math.nan, **size})
    return rows


# ---------------------------------------------------------------------------------------------
# Multi-pose repeatability


def _radiographs_of(demo_case: Path) -> list[Path]:
    main = [p for p in (demo_case / n for n in ("xray.dcm", "xray.png", "xray.jpg")) if p.is_file()]
    views = sorted((demo_case / "views").glob("view*.dcm"), key=lambda p: int(p.stem[4:]))
    return main + views


def _geometries_of(demo_case: Path) -> list[dict]:
    """Each radiograph's true geometry (``Geometry.to_dict``), in :func:`_radiographs_of` order."""
    geometries = [json.loads((demo_case / "truth.json").read_text())["geometry"]]
    views = demo_case / "views" / "views.json"
    if views.is_file():
        geometries += [v["geometry"] for v in json.loads(views.read_text())["views"]]
    return geometries


def true_heads_at(labels_path: Path, geometries: list[dict]) -> list[dict]:
    """The true femoral-head centres (row, col) per side (None where a side has no head) of a case's
    labels, projected with each geometry (``Geometry.to_dict``)."""
    import SimpleITK as sitk

    from bonedrr.geometry import Geometry
    from bonedrr.images import index_to_world
    from bonedrr.labels import SIDES, femoral_head_centre

    labels = sitk.ReadImage(str(labels_path))
    array = sitk.GetArrayFromImage(labels)
    centres = {s: femoral_head_centre(array, s, index_to_world(labels)) for s in SIDES}
    out = []
    for g in geometries:
        geometry = Geometry.from_dict(g)
        out.append({s: (None if c is None else [float(v) for v in geometry.project(np.asarray(c)[None])[0]])
                    for s, c in centres.items()})
    return out


def _true_heads(demo_case: Path) -> list[dict]:
    """Each radiograph's true femoral-head centres (row, col) per side, in :func:`_radiographs_of` order."""
    return true_heads_at(demo_case / "labels.nii.gz", _geometries_of(demo_case))


def true_drr_bmd_at(case_dir: Path, geometries: list[dict], threshold: float, cut_mm: float = 80.0) -> list[dict]:
    """The true DRR-BMD of each hip at each geometry (``Geometry.to_dict``): the case's proximal-femur
    DRRs (its density and labels, as the pipeline's) rendered there.

    Args:
        case_dir: The pipeline's case folder (``results/<cohort>/<case>``: ``density.nii.gz``,
            ``labels.nii.gz``).
        geometries: The radiographs' true geometries.
        threshold: DRR-BMD's projected-bone threshold, g/cm2.
        cut_mm: The proximal femur's cut below the lesser trochanter, as the DRRs'.

    Returns:
        One ``{side: DRR-BMD}`` per geometry.
    """
    from bonedrr.bmd import drr_bmd
    from bonedrr.drr import DEFAULT_CHANNELS, render_case
    from bonedrr.geometry import Geometry

    channels = {f"proximal_femur_{s}": DEFAULT_CHANNELS[f"proximal_femur_{s}"] for s in ("right", "left")}
    out = []
    for g in geometries:
        drr = render_case(case_dir / "density.nii.gz", case_dir / "labels.nii.gz", Geometry.from_dict(g),
                          channels=channels, device="cpu", cut_mm=cut_mm)
        out.append({s: drr_bmd(drr["drr"][drr["channels"].index(f"proximal_femur_{s}")], threshold)
                    for s in ("right", "left")})
    return out


def true_drr_bmd_by_pose(case_dir: Path, demo_case: Path, threshold: float, cut_mm: float = 80.0) -> list[dict]:
    """The true DRR-BMD of each hip on each radiograph of a demo patient (:func:`_radiographs_of`
    order; :func:`true_drr_bmd_at` its ``truth.json`` and ``views/views.json`` geometries). How much the
    truth itself changes with the pose: a model that followed it exactly would repeat this much, so it is
    the floor of the predicted BMD's RMS-CV."""
    return true_drr_bmd_at(case_dir, _geometries_of(demo_case), threshold, cut_mm)


def _kvp_of(radiograph, case: Path | None, k: int) -> float:
    """A sweep radiograph's tube voltage: its DICOM KVP or, for the case's own radiograph (``k`` 0)
    without one, what its ingest recorded (the sample sheet's ``xray_kvp``); NaN when neither has it."""
    if "KVP" in radiograph.metadata:
        return float(radiograph.metadata["KVP"])
    if k == 0 and case is not None and (case / "case.json").is_file():
        return float(json.loads((case / "case.json").read_text())["xray"].get("KVP", math.nan))
    return math.nan


def pose_sweep(model, patients: list[tuple[str, Path]], pack, default_pixel_mm, threshold: float,
               cases_root: Path | None = None) -> list[dict]:
    """BMD of each hip on each radiograph of the given demo patients, as ``bonedrr estimate`` reads it
    (the file read, the hips located by the model's locator and cut out by
    :func:`bonedrr.estimate.hip_crops`), and at the true hip centres. One row per (patient, side, radiograph).

    With ``cases_root`` (``results/<cohort>``), each row also holds the true DRR-BMD at that radiograph's
    pose (:func:`true_drr_bmd_by_pose`) where the case has its density and labels."""
    from bonedrr.dicom import read_radiograph
    from bonedrr.estimate import hip_crops as estimate_crops

    rows = []
    for patient_id, case_dir in patients:
        case = Path(cases_root) / case_dir.name if cases_root is not None else None
        truth_by_pose = None
        if case is not None and (case / "density.nii.gz").is_file():
            bmd_record = case / "bmd.json"  # the DRRs' proximal-femur cut
            cut_mm = json.loads(bmd_record.read_text()).get("proximal_femur_cut_mm", 80.0) if bmd_record.is_file() else 80.0
            truth_by_pose = true_drr_bmd_by_pose(case, case_dir, threshold, cut_mm)
        for k, (path, true_heads) in enumerate(zip(_radiographs_of(case_dir), _true_heads(case_dir))):
            radiograph = read_radiograph(path, default_pixel_mm)
            sides = [s for s in ("right", "left") if true_heads.get(s) is not None]
            try:
                located, facts = estimate_crops(model, radiograph.pixels, radiograph.pixel_mm, sides, False)
            except BonedrrError as e:  # no locator, or a hip not found: true hip centres only
                log.warning("%s %s: %s", case_dir.name, path.name, e)
                located, facts = np.zeros((0,) + tuple(pack.crop_px), np.float32), {}
            true = np.stack([recrop(radiograph.pixels, radiograph.pixel_mm, true_heads[s], s, pack) for s in sides])
            values, _ = predicted_bmd(model, np.concatenate([true, located]), threshold,
                                      model.overview_of(radiograph.pixels, radiograph.pixel_mm),
                                      _kvp_of(radiograph, case, k))
            for i, side in enumerate(sides):
                row = {"patient_id": patient_id, "case_id": case_dir.name, "side": side, "radiograph": k, "file": path.name,
                       "bmd_true_hips": float(values[i]),
                       "bmd_located_hips": float(values[len(sides) + i]) if facts else math.nan}
                if facts:
                    d = np.subtract(facts[side]["femoral_head_px"], true_heads[side]) * radiograph.pixel_mm
                    row["locator_error_mm"] = float(np.hypot(*d))
                if truth_by_pose is not None:
                    row["true_drr_bmd"] = float(truth_by_pose[k][side])
                rows.append(row)
    return rows


def summarise_pose(rows: list[dict]) -> dict:
    """RMS-CV of BMD over each hip's radiographs (located and true hips) and the locator's error."""
    out = {}
    for key in ("bmd_located_hips", "bmd_true_hips", "true_drr_bmd"):
        if not any(key in r for r in rows):
            continue
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["patient_id"], r["side"]), []).append(r.get(key, math.nan))
        out[key] = metrics.rms_cv(groups.values())
    errors = np.array([r.get("locator_error_mm", math.nan) for r in rows], float)
    out["locator_error_mm"] = {"median": float(np.nanmedian(errors)) if np.isfinite(errors).any() else math.nan,
                               "max": float(np.nanmax(errors)) if np.isfinite(errors).any() else math.nan}
    out["radiographs_per_hip"] = (len(rows) / max(len({(r["patient_id"], r["side"]) for r in rows}), 1))
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def validate_cohort(shard_dir: str | Path, model_dirs: list[str | Path], out_dir: str | Path, *,
                    cases_root: str | Path | None = None, demo_root: str | Path | None = None,
                    default_pixel_mm=(1.4, 1.4), settings: ValidationSettings | None = None,
                    cohort: str | None = None, models: dict | None = None, progress: bool = True,
                    qc_dir: str | Path | None = None) -> dict:
    """Validate the fold models of one cohort; write predictions.csv, metrics.json, plots and report.html.

    Args:
        shard_dir: The cohort's shard folder.
        model_dirs: Model folders named ``*_fold<k>``, one per held-out fold to validate.
        out_dir: ``results/validation/<cohort>``.
        cases_root: ``results/<cohort>`` (whole radiographs for the JPEG sweep); None: no JPEG sweep.
        demo_root: ``results/<cohort>/demo_input`` of a demo cohort with extra views; None: no pose sweep.
        default_pixel_mm: The cohort's ``xray.pixel_mm`` (PNG/JPEG radiographs of the pose sweep).
        settings: See :class:`ValidationSettings`.
        cohort: Name shown in the report.
        models: ``{fold: model}`` to use instead of loading ``model_dirs`` (objects honouring the
            model API: ``channels``, ``crop_shape``, ``predict``, ``locate_hips``); for tests.
        progress: Show a progress bar over folds.
        qc_dir: ``results/<cohort>/qc``: its segmentation, registration and failures tables are
            summarised in the report (:func:`pipeline_quality`); None: left out.

    Returns:
        The metrics (as written to metrics.json).
    """
    from tqdm import tqdm

    from bonedrr.dataset import ShardDataset

    settings = settings or ValidationSettings()
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    pack = _pack_settings(shard_dir)
    if models is None:
        from bonedrr.train import load_model

        models = {}
        for d in model_dirs:
            models[fold_of_model(d)] = load_model(d, device=_device(settings.device))
    model_paths = {fold_of_model(d): d for d in model_dirs}
    if not models:
        raise BonedrrError("no model to validate", shard_dir)
    all_index = ShardDataset(shard_dir).index
    patients_by_fold: dict = {}
    for row in all_index:
        patients_by_fold.setdefault(int(row["fold"]), {})[row["patient_id"]] = row["case_id"]

    per_sample, jpeg_rows, pose_rows, examples, fold_info = [], [], [], [], {}
    images: dict = {}
    for fold in tqdm(sorted(models), desc="folds", unit="fold", disable=not progress):
        model = models[fold]
        channels = [c for c in model.channels if c in ShardDataset(shard_dir).channels]
        held = load_samples(ShardDataset(shard_dir, folds=[fold], channels=channels))
        train = load_samples(ShardDataset(shard_dir, exclude_folds=[fold], channels=channels))
        if not held["sample_id"]:
            log.warning("fold %d has no held-out samples", fold)
            continue
        leaked = sorted(set(getattr(model, "info", {}).get("patients") or []) & set(held["patient_id"]))
        if leaked:  # a model folder named for the wrong fold, or trained on everything
            raise BonedrrError(f"the model of fold {fold} was trained on {len(leaked)} of its held-out patients "
                               f"({', '.join(leaked[:3])}{', ...' if len(leaked) > 3 else ''})",
                               model_paths.get(fold, shard_dir))
        thr = settings.threshold_g_cm2
        pred_bmd, pred = predicted_bmd(model, held["xray"], thr, held["overview"], held["kvp"])
        train_bmd, train_pred = predicted_bmd(model, train["xray"], thr, train["overview"], train["kvp"])
        pred_vbmd = drr_vbmd_of(model.channels, pred, thr)
        true_vbmd = drr_vbmd_of(held["channels"], held["drr"], thr)
        if pred_vbmd is not None and true_vbmd is None:
            raise BonedrrError(f"the model of fold {fold} predicts {THICKNESS_CHANNEL} but the shards lack it "
                               "(packed before format 1.2): rerun the drr and pack_shards rules", shard_dir)
        model_fits, drr_bmd_qct_fit = fit_readouts(train_bmd, drr_vbmd_of(model.channels, train_pred, thr), train)
        base_fits = fit_calibrations(roi_intensity(train["xray"], train["mask"], train["overview"]), train)
        ceiling_fits, ceiling_drr_bmd_qct_fit = fit_readouts(
            train["drr_bmd"], drr_vbmd_of(train["channels"], train["drr"], thr) if pred_vbmd is not None else None,
            train)
        held_roi = roi_intensity(held["xray"], held["mask"], held["overview"])
        fold_info[fold] = {"n_held_out": len(held["sample_id"]), "n_train": len(train["sample_id"]),
                           "train_folds": sorted(set(train["fold"])), "model_calibration": model_fits,
                           "baseline_fit": base_fits}
        im = image_metrics(pred, held["drr"], list(model.channels), held["channels"])
        for c, v in im.items():
            images.setdefault(c, {"psnr_db": [], "ssim": []})
            images[c]["psnr_db"] += v["psnr_db"]
            images[c]["ssim"] += v["ssim"]
        k_pf = list(model.channels).index(BMD_CHANNEL)
        for i in range(len(held["sample_id"])):
            row = {"fold": fold, "sample_id": held["sample_id"][i], "case_id": held["case_id"][i],
                   "patient_id": held["patient_id"][i], "side": held["side"][i],
                   "pred_drr_bmd": pred_bmd[i], "baseline_roi_intensity": held_roi[i]}
            one = slice(i, i + 1)
            pv, tv = (pred_vbmd[one], true_vbmd[one]) if pred_vbmd is not None else (None, None)
            for key in TRUTHS:
                row[f"true_{key}"] = held[key][i]
                row[f"pred_{key}"] = in_truth_units(pred_bmd[one], model_fits, key, True, pv)[0]
                row[f"baseline_{key}"] = apply_line(base_fits[key], held_roi[one])[0]
                row[f"ceiling_{key}"] = in_truth_units(held["drr_bmd"][one], ceiling_fits, key, True, tv)[0]
            if pv is not None:
                row.update(pred_drr_vbmd=pv[0], true_drr_vbmd=tv[0],
                           pred_qct_vbmd_from_drr_bmd=apply_line(drr_bmd_qct_fit, pred_bmd[one])[0],
                           ceiling_qct_vbmd_from_drr_bmd=apply_line(ceiling_drr_bmd_qct_fit, held["drr_bmd"][one])[0])
            if BMD_CHANNEL in im:
                row["psnr_db_proximal_femur"] = im[BMD_CHANNEL]["psnr_db"][i]
                row["ssim_proximal_femur"] = im[BMD_CHANNEL]["ssim"][i]
            per_sample.append(row)
        j_pf = held["channels"].index(BMD_CHANNEL)
        for i in range(min(settings.examples - len(examples), len(held["sample_id"]))):
            examples.append({"sample_id": held["sample_id"][i], "xray": held["xray"][i],
                             "true": held["drr"][i, j_pf], "pred": pred[i, k_pf],
                             "true_bmd": held["drr_bmd"][i], "pred_bmd": pred_bmd[i]})
        if cases_root is not None and (settings.jpeg_qualities or settings.jpeg_ratios):
            offset = len(per_sample) - len(held["sample_id"])
            for r in jpeg_sweep(model, held, Path(cases_root), pack, settings.jpeg_qualities, settings.threshold_g_cm2,
                                settings.jpeg_ratios):
                r["row"] = offset + r.pop("sample_index")
                vbmd = np.array([r["pred_drr_vbmd"]]) if pred_vbmd is not None else None
                for key in TRUTHS:
                    r[f"pred_{key}"] = in_truth_units(np.array([r["pred_drr_bmd"]]), model_fits, key, True, vbmd)[0]
                jpeg_rows.append(r)
        if demo_root is not None:
            patients = [(pid, Path(demo_root) / case) for pid, case in sorted(patients_by_fold.get(fold, {}).items())
                        if (Path(demo_root) / case / "views").is_dir()]
            pose_rows += pose_sweep(model, patients, pack, default_pixel_mm, settings.threshold_g_cm2, cases_root)

    result = summarise(per_sample, jpeg_rows, pose_rows, images, fold_info, cohort, settings)
    if qc_dir is not None:
        result["pipeline"] = pipeline_quality(qc_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(out_dir / "predictions.csv", per_sample)
    write_predictions(out_dir / "jpeg.csv", [{**{k: per_sample[r["row"]][k] for k in ("sample_id", "case_id", "side")},
                                              **r} for r in jpeg_rows], JPEG_COLUMNS)
    write_predictions(out_dir / "pose.csv", pose_rows, POSE_COLUMNS)
    write_json(out_dir / "metrics.json", _finite(result))
    from bonedrr.validation_report import write_plots, write_report

    plots = write_plots(out_dir / "plots", per_sample, jpeg_rows, pose_rows, examples, result)
    write_report(out_dir / "report.html", result, plots)
    return result


def _read_tsv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: Structures whose segmentation Dice the report summarises (the bones BMD and registration rest on).
QC_STRUCTURES = ("femur_left", "femur_right", "hip_left", "hip_right")


def pipeline_quality(qc_dir: str | Path) -> dict:
    """The upstream stages' quality from a cohort's QC tables, for the report and metrics.json.

    Returns ``segmentation``: per split (``test``: held out from the segmenter's training; ``train``)
    and structure, the case count and the mean and smallest Dice; ``registration``: each case's GC,
    QA flags and (where the truth is known) mPD, rotation error and mTRE; ``failures``: each failed
    case's stage and reason. A missing table gives an empty entry.
    """
    qc_dir = Path(qc_dir)
    segmentation: dict = {}
    for row in _read_tsv(qc_dir / "segmentation.tsv"):
        for name in QC_STRUCTURES:
            dice = _float(row.get(f"dice_{name}"))
            if np.isfinite(dice):
                segmentation.setdefault(row.get("split", ""), {}).setdefault(name, []).append(dice)
    segmentation = {split: {name: {"n": len(v), "mean_dice": float(np.mean(v)), "min_dice": float(np.min(v))}
                            for name, v in by_name.items()} for split, by_name in segmentation.items()}
    registration = []
    for row in _read_tsv(qc_dir / "registration.tsv"):
        entry = {"case_id": row["case_id"], "gc": _float(row.get("gc")),
                 "qa_flags": [] if row.get("qa_flags") in (None, "", "-") else row["qa_flags"].split(",")}
        for key in ("mpd_mm", "rotation_error_deg", "mtre_mm", "depth_error_mm"):
            entry[key] = _float(row.get(key))
        registration.append(entry)
    return {"segmentation": segmentation, "registration": registration,
            "failures": _read_tsv(qc_dir / "failures.tsv")}


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key, math.nan) for r in rows], float)


def summarise(per_sample, jpeg_rows, pose_rows, images, fold_info, cohort, settings) -> dict:
    """metrics.json: pooled held-out metrics per ground truth for the model and the baseline, image
    metrics, osteoporosis classification, the sweeps, and the issue's targets checked."""
    result = {
        "cohort": cohort, "n_samples": len(per_sample), "folds": sorted(fold_info),
        "definitions": {
            "icc": "ICC(2,1): two-way random effects, absolute agreement, single measurement (Shrout & Fleiss 1979)",
            "bland_altman": "bias = mean(prediction - truth); limits of agreement = bias +- 1.96 SD (ddof 1)",
            "psnr_ssim": "per sample and channel, data range = the true channel's maximum; SSIM: Wang et al. 2004, "
                         "Gaussian window sigma 1.5 (11 x 11), K1 0.01, K2 0.03",
            "t_score": metrics.T_SCORE_REFERENCE["population"] + f": mean {metrics.T_SCORE_REFERENCE['mean_g_cm2']}, "
                       f"SD {metrics.T_SCORE_REFERENCE['sd_g_cm2']} g/cm2; applied to DXA aBMD and to predictions "
                       "calibrated to DXA",
            "calibration": "QCT and DXA: a line from the prediction (DXA: DRR-BMD; QCT: as qct_readout says; "
                           "baseline: ROI mean intensity) to the truth, fitted on the training folds of each fold's "
                           "model; DRR-BMD: uncalibrated (baseline: fitted like the others)",
            "jpeg_ratio": "uncompressed 8-bit size (rows x cols bytes) / JPEG size of the whole radiograph",
            "rms_cv": "sqrt(mean over hips of (SD / mean)^2) of BMD over each hip's radiographs (Gluer 1995)",
            "true_drr_bmd_rms_cv": "the same of the true DRR-BMD, the case's proximal-femur DRR rendered at each "
                                   "radiograph's true pose: how much the truth itself changes with the pose",
            "ceiling": "the true DRR-BMD (against QCT: what qct_readout reads, of the true DRR), calibrated to QCT "
                       "and DXA like the predictions: what a perfect decomposition would reach",
            "drr_vbmd": "the proximal femur's mineral over its volume: the sum of the proximal-femur channel over "
                        "its projected bone area (the DRR-BMD pixels) over the sum of its thickness channel there, "
                        "mg/cm3 (bonedrr.bmd.drr_vbmd)",
        },
        "qct_readout": "drr_vbmd" if any("pred_drr_vbmd" in r for r in per_sample) else "drr_bmd",
        "bmd_threshold_g_cm2": settings.threshold_g_cm2,
        "model": {}, "baseline": {}, "ceiling": {}, "per_fold": {},
    }
    for key, (label, unit) in TRUTHS.items():
        truth = _column(per_sample, f"true_{key}")
        for who, prefix in (("model", "pred"), ("baseline", "baseline"), ("ceiling", "ceiling")):
            m = metrics.agreement(_column(per_sample, f"{prefix}_{key}"), truth)
            if m["n"] >= 3 and not (who == "ceiling" and key == "drr_bmd"):
                result[who][key] = {"label": label, "unit": unit, **m}
    for fold in fold_info:
        rows = [r for r in per_sample if r["fold"] == fold]
        result["per_fold"][str(fold)] = {**fold_info[fold], "model": {
            key: metrics.agreement(_column(rows, f"pred_{key}"), _column(rows, f"true_{key}")) for key in TRUTHS}}
    if result["qct_readout"] == "drr_vbmd":  # the areal read-out against QCT beside it, and DRR-vBMD itself
        truth = _column(per_sample, "true_qct_vbmd")
        result["qct_from_drr_bmd"] = {who: metrics.agreement(_column(per_sample, f"{prefix}_qct_vbmd_from_drr_bmd"), truth)
                                      for who, prefix in (("model", "pred"), ("ceiling", "ceiling"))}
        result["drr_vbmd"] = metrics.agreement(_column(per_sample, "pred_drr_vbmd"), _column(per_sample, "true_drr_vbmd"))
    result["osteoporosis"] = {}
    if np.isfinite(_column(per_sample, "true_dxa_abmd")).sum() >= 3:
        for who, col in (("model", "pred_dxa_abmd"), ("baseline", "baseline_dxa_abmd")):
            result["osteoporosis"][who] = metrics.osteoporosis_classification(
                _column(per_sample, col), _column(per_sample, "true_dxa_abmd"))
    result["decomposition"] = {c: {"psnr_db": float(np.nanmean(v["psnr_db"])), "ssim": float(np.nanmean(v["ssim"])),
                                   "n": int(np.isfinite(v["ssim"]).sum())} for c, v in images.items()}
    result["jpeg"] = summarise_jpeg(per_sample, jpeg_rows)
    result["pose"] = summarise_pose(pose_rows) if pose_rows else None
    result["targets"] = check_targets(result)
    return result


def summarise_jpeg(per_sample: list[dict], jpeg_rows: list[dict]) -> list[dict]:
    """Per sweep point (each fixed quality, falling; then each target ratio, rising): mean compression
    ratios, agreement with each truth, and the mean absolute change of predicted DRR-BMD from the
    uncompressed prediction. A target ratio's entry has ``quality`` None, ``target_ratio``, the range
    of the qualities that reached it (``qualities``), its lowest ratio (``min_ratio_raw8``) and how many
    radiographs fell short of it even at quality 1 (``n_short_of_ratio``: small images)."""
    fixed = [r for r in jpeg_rows if r.get("target_ratio") is None]
    groups = [(q, None, [r for r in fixed if r["quality"] == q])
              for q in sorted({r["quality"] for r in fixed}, reverse=True)]
    groups += [(None, ratio, [r for r in jpeg_rows if r.get("target_ratio") == ratio])
               for ratio in sorted({r["target_ratio"] for r in jpeg_rows} - {None})]
    out = []
    for quality, ratio, rows in groups:
        base = np.array([per_sample[r["row"]]["pred_drr_bmd"] for r in rows], float)
        entry = {"quality": quality, "target_ratio": ratio}
        if ratio is not None:
            entry.update(qualities=[min(r["quality"] for r in rows), max(r["quality"] for r in rows)],
                         min_ratio_raw8=float(min(r["ratio_raw8"] for r in rows)),
                         n_short_of_ratio=sum(r["ratio_raw8"] < ratio for r in rows))
        entry.update(ratio_raw8=float(np.mean([r["ratio_raw8"] for r in rows])),
                     ratio_png=float(np.mean([r["ratio_png"] for r in rows])),
                     mean_abs_change_g_cm2=float(np.nanmean(np.abs(_column(rows, "pred_drr_bmd") - base))),
                     n=len(rows))
        for key in TRUTHS:
            truth = np.array([per_sample[r["row"]][f"true_{key}"] for r in rows], float)
            m = metrics.agreement(_column(rows, f"pred_{key}"), truth)
            entry[key] = {"pearson_r": m["pearson_r"], "icc_2_1": m["icc_2_1"], "mae": m["mae"]}
        out.append(entry)
    return out


def check_targets(result: dict) -> dict:
    """Issue 7's targets, each with the value reached and whether it is met (None: not measurable, as
    where a truth is missing or a correlation is undefined: too few hips, or constant values)."""
    def target(requirement: str, value, holds) -> dict:
        measured = value is not None and bool(np.isfinite(value))
        return {"target": requirement, "value": value, "met": bool(holds(value)) if measured else None}

    t = {}
    for key in ("qct_vbmd", "drr_bmd"):
        m, b = result["model"].get(key) or {}, result["baseline"].get(key) or {}
        r, icc, r_base = m.get("pearson_r"), m.get("icc_2_1"), b.get("pearson_r")
        t[f"pearson_r_{key}"] = target(f">= {TARGETS['pearson_r']}", r, lambda v: v >= TARGETS["pearson_r"])
        t[f"icc_{key}"] = target(f">= {TARGETS['icc_2_1']}", icc, lambda v: v >= TARGETS["icc_2_1"])
        t[f"above_baseline_{key}"] = target("model r > baseline r",
                                            r_base if r is not None and np.isfinite(r) else None, lambda v: r > v)
    ratio = TARGETS["jpeg_ratio"]
    requirement = (f"Pearson r (QCT vBMD) with each radiograph JPEG-compressed to 1/{ratio:.0f} of its 8-bit size "
                   f"within {TARGETS['jpeg_max_r_drop']} of uncompressed (value: the change)")
    r = (result["model"].get("qct_vbmd") or {}).get("pearson_r")
    at = [j for j in result["jpeg"] if j.get("target_ratio") == ratio]
    if result["jpeg"] and not at:
        requirement += f" (not measured: validate.jpeg_ratios lacks {ratio:.0f})"
    elif at and at[0]["n_short_of_ratio"]:
        requirement += (f" (not measured: {at[0]['n_short_of_ratio']} of {at[0]['n']} radiographs do not compress "
                        f"{ratio:.0f}x even at quality 1, down to {at[0]['min_ratio_raw8']:.0f}x)")
        at = []
    change = abs(at[0]["qct_vbmd"]["pearson_r"] - r) if at and r is not None else None
    t["jpeg_1_50"] = target(requirement, change, lambda v: v <= TARGETS["jpeg_max_r_drop"])
    pose = result.get("pose")
    t["pose_rms_cv"] = target(f"< {TARGETS['pose_rms_cv']:.0%}", pose["bmd_located_hips"]["rms_cv"] if pose else None,
                              lambda v: v < TARGETS["pose_rms_cv"])
    return t


PREDICTION_COLUMNS = ("fold", "sample_id", "case_id", "patient_id", "side", "pred_drr_bmd", "true_drr_bmd",
                      "pred_qct_vbmd", "true_qct_vbmd", "pred_dxa_abmd", "true_dxa_abmd", "baseline_roi_intensity",
                      "baseline_drr_bmd", "baseline_qct_vbmd", "baseline_dxa_abmd", "ceiling_qct_vbmd",
                      "ceiling_dxa_abmd", "psnr_db_proximal_femur", "ssim_proximal_femur",
                      # with a thickness channel (else empty): DRR-vBMD, and QCT read the areal way beside it
                      "pred_drr_vbmd", "true_drr_vbmd", "pred_qct_vbmd_from_drr_bmd", "ceiling_qct_vbmd_from_drr_bmd")


#: jpeg.csv: one row per held-out hip and sweep point (a quality, or a target ratio and the quality reaching it).
JPEG_COLUMNS = ("sample_id", "case_id", "side", "quality", "target_ratio", "ratio_raw8", "ratio_png", "jpeg_bytes", "pred_drr_bmd",
                "pred_drr_vbmd", "pred_qct_vbmd", "pred_dxa_abmd")
#: pose.csv: one row per hip and radiograph of the multi-pose sweep.
POSE_COLUMNS = ("patient_id", "case_id", "side", "radiograph", "file", "bmd_located_hips", "bmd_true_hips",
                "true_drr_bmd", "locator_error_mm")


def write_predictions(path: Path, rows: list[dict], columns=PREDICTION_COLUMNS) -> None:
    """predictions.csv: one row per held-out hip (units: g/cm2, QCT mg/cm3; empty = unknown); with other
    ``columns``, jpeg.csv and pose.csv alike."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                                (round(v, 6) if isinstance(v, float) else v)) for k, v in r.items()})


def _finite(obj):
    """NaN and infinities as null, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
