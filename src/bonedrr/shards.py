"""The ``pack_shards`` stage: a cohort's registered cases as HDF5 training shards.

One sample is one hip of one radiograph, always in the right hip's orientation: a left hip's crop is
mirrored left-right (``mirrored`` = 1). Per sample: the radiograph crop around the femoral head, the
DRR channels on the same grid (g/cm2), structure masks, BMD targets, the crop box and pixel spacing,
the femoral head in the crop, a whole-radiograph overview, registration QA, the pseudonymous patient
id and the cross-validation fold. The layout is ``docs/shards.md`` (versioned by
:data:`FORMAT_VERSION`); reading it needs h5py alone.

Folds are patient-disjoint and stable: a patient's fold is ``sha256(f"{seed}:{patient_id}") mod k``
(:func:`fold_of`), so adding cases never moves an old one.

Writing is atomic for the whole pack: everything goes to a hidden temporary folder beside the output,
the manifest (with each shard's SHA-256) last, and the folder is renamed into place only when complete.
A killed pack leaves at most a ``.shards.tmp-*`` folder without a manifest (removed by the next pack).

Example:
    >>> fold_of("patient_17", k=5, seed=0)
    3
    >>> crop_grid((100.0, 80.0), "left", (1.4, 1.4), PackSettings())["box_px"]
    [48.571, 54.286, 220.0, 140.0]
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from bonedrr import __version__
from bonedrr.bmd import BMD_THRESHOLD_G_CM2, drr_bmd, sides_of
from bonedrr.errors import BonedrrError, InputError
from bonedrr.images import _UMASK, atomic_path, sha256_of, write_json

log = logging.getLogger("bonedrr.shards")

#: Version of the layout in docs/shards.md (major: readers must change; minor: additions only).
FORMAT_VERSION = "1.2"
#: Side-normalised DRR channels of a sample, in this order; the drr.h5 channel each is taken from.
#: ``proximal_femur_thickness`` is in cm (:data:`bonedrr.bmd.THICKNESS_CHANNEL`), the others in g/cm2.
CHANNELS = ("proximal_femur", "femur", "hip", "pelvis", "bone", "muscle", "soft_tissue", "proximal_femur_thickness")
#: Structure masks (``mask``): the channel above the BMD threshold, i.e. its projected bone area.
MASKS = ("proximal_femur", "femur", "hip", "pelvis")
#: (rows, cols) of the whole-radiograph overview of every sample.
OVERVIEW_SHAPE = (128, 256)
COMPRESSIONS = ("none", "lzf", "gzip-1", "gzip-4", "gzip-9")
INDEX_COLUMNS = ("sample_id", "case_id", "patient_id", "side", "mirrored", "fold", "shard", "row",
                 "drr_bmd_g_cm2", "drr_bmd_full_g_cm2", "qct_vbmd_mg_cm3", "dxa_abmd_g_cm2", "kvp",
                 "registration_similarity", "registration_converged", "qa_flags")


def drr_channel_of(channel: str, side: str) -> str:
    """The drr.h5 channel a side-normalised channel comes from (``femur`` of a left hip: ``femur_left``)."""
    return f"{channel}_{side}" if channel in ("proximal_femur", "femur", "hip", "proximal_femur_thickness") else channel


@dataclass
class PackSettings:
    """How hips are cropped and shards written (config ``shards``; docs/shards.md).

    Attributes:
        crop_mm: (height, width) of the crop at the detector, mm.
        crop_px: (rows, cols) of the stored crop; rows = 2 x cols (portrait 2:1).
        head_position: Where the femoral head centre lies in the crop, as fractions of its (height,
            width), in the right hip's orientation (lateral = left of the image).
        folds: Number of cross-validation folds (k).
        seed: Seed of the fold assignment.
        shard_size_mb: Target uncompressed size of one shard file, MB.
        compression: ``none``, ``lzf`` or ``gzip-<level>``.
        threshold_g_cm2: Projected-bone threshold of DRR-BMD and of the masks.
    """

    crop_mm: tuple[float, float] = (240.0, 120.0)
    crop_px: tuple[int, int] = (128, 64)
    head_position: tuple[float, float] = (0.3, 0.7)
    folds: int = 5
    seed: int = 0
    shard_size_mb: float = 1000.0
    compression: str = "lzf"
    threshold_g_cm2: float = BMD_THRESHOLD_G_CM2
    channels: tuple[str, ...] = field(default=CHANNELS)

    def __post_init__(self):
        rows, cols = (int(v) for v in self.crop_px)
        if rows != 2 * cols:
            raise BonedrrError(f"shards.crop_px must be portrait 2:1 (rows = 2 x cols), got {rows}x{cols}")
        if self.compression not in COMPRESSIONS:
            raise BonedrrError(f"shards.compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        self.crop_px = (rows, cols)
        self.crop_mm = tuple(float(v) for v in self.crop_mm)
        self.head_position = tuple(float(v) for v in self.head_position)

    @property
    def crop_pixel_mm(self) -> tuple[float, float]:
        return (self.crop_mm[0] / self.crop_px[0], self.crop_mm[1] / self.crop_px[1])


def fold_of(patient_id: str, k: int, seed: int) -> int:
    """A patient's fold: the first 8 bytes of ``sha256(f"{seed}:{patient_id}")`` modulo ``k``.

    Depends on nothing but the patient, so adding or removing patients never moves another one.
    """
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % k


# ---------------------------------------------------------------------------------------------
# Resampling: the crop and the overview are the same bilinear sampling of the radiograph and of
# every DRR channel (with a Gaussian anti-aliasing prefilter where the grid is coarser).


def crop_grid(head_px, side: str, image_pixel_mm, settings: PackSettings) -> dict:
    """Where a hip crop's pixel centres lie in the radiograph (fractional pixel indices).

    Pixel centres of the radiograph are at integer indices (it spans -0.5 .. n - 0.5). Crop pixel
    (i, j) samples row ``head_r + (i + 0.5 - fr * H) * sr / pr`` and, for a right hip, column
    ``head_c + (j + 0.5 - fc * W) * sc / pc``; a left hip samples the mirrored columns (``head_c - ...``),
    so its crop is the plain crop of the same box flipped left-right.

    Returns:
        ``{"rows": (H,), "cols": (W,), "box_px": [top, left, bottom, right] (edges, radiograph pixels),
        "head_crop_px": [row, col], "zoom": (row, col) radiograph pixels per crop pixel}``.
    """
    (hr, hc), (pr, pc) = (float(v) for v in head_px), (float(v) for v in image_pixel_mm)
    (h, w), (sr, sc), (fr, fc) = settings.crop_px, settings.crop_pixel_mm, settings.head_position
    zr, zc = sr / pr, sc / pc
    sign = 1.0 if side == "right" else -1.0
    rows = hr + (np.arange(h) + 0.5 - fr * h) * zr
    cols = hc + sign * (np.arange(w) + 0.5 - fc * w) * zc
    top, bottom = hr - fr * h * zr, hr + (1 - fr) * h * zr
    left, right = (hc - fc * w * zc, hc + (1 - fc) * w * zc) if side == "right" else (
        hc - (1 - fc) * w * zc, hc + fc * w * zc)
    return {"rows": rows, "cols": cols, "box_px": [round(v, 3) for v in (top, left, bottom, right)],
            "head_crop_px": [fr * h - 0.5, fc * w - 0.5], "zoom": (zr, zc)}


def overview_grid(shape, image_pixel_mm, side: str, out_shape=OVERVIEW_SHAPE) -> dict:
    """The whole radiograph fitted into ``out_shape`` (aspect kept, centred, zero padded; mirrored for
    a left hip). Returns sample positions like :func:`crop_grid` and ``to_overview(row, col)``."""
    (n_r, n_c), (pr, pc), (h, w) = shape, image_pixel_mm, out_shape
    s = max(n_r * pr / h, n_c * pc / w)  # mm per overview pixel, both axes
    sign = 1.0 if side == "right" else -1.0
    rows = (n_r * pr / 2 + (np.arange(h) + 0.5 - h / 2) * s) / pr - 0.5
    cols = (n_c * pc / 2 + sign * (np.arange(w) + 0.5 - w / 2) * s) / pc - 0.5

    def to_overview(r, c):
        return [((r + 0.5) * pr - n_r * pr / 2) / s + h / 2 - 0.5,
                sign * ((c + 0.5) * pc - n_c * pc / 2) / s + w / 2 - 0.5]

    return {"rows": rows, "cols": cols, "to_overview": to_overview, "zoom": (s / pr, s / pc)}


def resample(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, zoom) -> np.ndarray:
    """Bilinear samples of ``images`` (..., R, C) at the grid ``rows`` x ``cols``, zero outside.

    Where the grid is coarser than the image (``zoom`` > 1: image pixels per sample), a Gaussian of
    sigma (zoom - 1) / 2 image pixels (scikit-image's anti-aliasing rule) is applied first.
    """
    images = np.asarray(images, np.float32)
    lead = images.shape[:-2]
    flat = images.reshape((-1,) + images.shape[-2:])
    sigma = [max(0.0, (z - 1) / 2) for z in zoom]
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((flat.shape[0], rows.size, cols.size), np.float32)
    for i, image in enumerate(flat):
        if max(sigma) > 0:
            image = ndimage.gaussian_filter(image, sigma, mode="constant")
        out[i] = ndimage.map_coordinates(image, [rr, cc], order=1, mode="constant", cval=0.0)
    return out.reshape(lead + out.shape[1:])


# ---------------------------------------------------------------------------------------------
# Samples of one case


class Excluded(Exception):
    """A case (or one hip) that must not enter the shards; the message is the reason."""


def case_samples(case_dir: str | Path, settings: PackSettings) -> tuple[list[dict], list[dict]]:
    """The samples (one per hip) of one case folder, and the hips excluded with their reasons.

    Raises:
        Excluded: The whole case is left out (a stage's output missing, registration failed its QA).
        InputError: A file is there but cannot be read (the pack stops: something is broken).
    """
    import SimpleITK as sitk

    from bonedrr.drr import read_drr
    from bonedrr.images import read_volume

    case_dir = Path(case_dir)
    needed = ("case.json", "xray.nii.gz", "pose.json", "drr.h5", "bmd.json")
    missing = [n for n in needed if not (case_dir / n).is_file()]
    if missing:
        raise Excluded(f"missing {', '.join(missing)} (a stage failed or has not run)")
    try:
        record = json.loads((case_dir / "case.json").read_text())
        pose = json.loads((case_dir / "pose.json").read_text())
        bmd = json.loads((case_dir / "bmd.json").read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not JSON ({e})", case_dir) from e
    if not pose.get("converged", False):
        raise Excluded(f"registration failed its QA ({', '.join(pose.get('qa_flags', [])) or 'not converged'})")
    try:
        drr = read_drr(case_dir / "drr.h5")
    except (OSError, KeyError) as e:
        raise InputError(f"cannot read DRR ({e})", case_dir / "drr.h5") from e
    xray = sitk.GetArrayFromImage(read_volume(case_dir / "xray.nii.gz")).astype(np.float32)
    xray = xray.reshape(xray.shape[-2:])
    geometry = drr["geometry"]
    if drr["drr"].shape[1:] != xray.shape:
        raise InputError(f"DRR grid {drr['drr'].shape[1:]} differs from the radiograph's {xray.shape}",
                         case_dir / "drr.h5")
    pixel_mm = tuple(geometry["pixel_mm"])
    patient_id = str(record.get("patient_id") or record["case_id"])
    samples, excluded = [], []
    for side in sides_of(record):
        hip = bmd["sides"].get(side)
        sources = [drr_channel_of(c, side) for c in settings.channels]
        lacking = [s for s in sources if s not in drr["channels"]]
        reason = None
        if hip is None or hip["femoral_head_px"] is None:
            reason = f"no {side} femur in the labels"
        elif lacking:
            reason = f"drr.h5 lacks channel(s) {', '.join(lacking)}"
        else:
            head_r, head_c = hip["femoral_head_px"]
            if not (0 <= head_r < xray.shape[0] and 0 <= head_c < xray.shape[1]):
                reason = "the femoral head projects outside the radiograph"
        if reason:
            excluded.append({"case_id": record["case_id"], "side": side, "reason": reason})
            continue
        grid = crop_grid(hip["femoral_head_px"], side, pixel_mm, settings)
        channel_images = drr["drr"][[drr["channels"].index(s) for s in sources]]
        crops = resample(np.concatenate([xray[None], channel_images]), grid["rows"], grid["cols"], grid["zoom"])
        view = overview_grid(xray.shape, pixel_mm, side)
        pf = crops[1 + list(settings.channels).index("proximal_femur")] if "proximal_femur" in settings.channels \
            else None
        samples.append({
            "sample_id": f"{record['case_id']}_{side}", "case_id": record["case_id"], "patient_id": patient_id,
            "side": side, "mirrored": int(side == "left"),
            "xray": crops[0], "drr": crops[1:],
            "mask": np.stack([crops[1 + list(settings.channels).index(m)] > settings.threshold_g_cm2
                              for m in MASKS if m in settings.channels]).astype(np.uint8),
            "overview": resample(xray, view["rows"], view["cols"], view["zoom"]),
            "head_overview_px": view["to_overview"](head_r, head_c),
            "head_crop_px": grid["head_crop_px"], "crop_box_px": grid["box_px"],
            "pixel_mm": list(settings.crop_pixel_mm),
            "drr_bmd_g_cm2": drr_bmd(pf, settings.threshold_g_cm2) if pf is not None else math.nan,
            "drr_bmd_full_g_cm2": _nan(hip["drr_bmd_g_cm2"]),
            "qct_vbmd_mg_cm3": _nan(hip["qct_vbmd_mg_cm3"]), "dxa_abmd_g_cm2": _nan(hip["dxa_abmd_g_cm2"]),
            "kvp": _nan(record.get("xray", {}).get("KVP")),
            "registration_similarity": float(pose.get("similarity_value", math.nan)),
            "registration_converged": int(bool(pose.get("converged"))),
            "qa_flags": ",".join(pose.get("qa_flags", [])),
            "world_to_camera": np.asarray(geometry["world_to_camera"], np.float64),
            "geometry": json.dumps({k: geometry[k] for k in ("sdd_mm", "rows", "cols", "pixel_mm",
                                                             "principal_point_px")}),
        })
    return samples, excluded


def _nan(v) -> float:
    return math.nan if v is None else float(v)


# ---------------------------------------------------------------------------------------------
# Writing


def _compression_args(name: str) -> dict:
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    return {"compression": "gzip", "compression_opts": int(name.split("-")[1])}


def sample_nbytes(settings: PackSettings) -> int:
    """Uncompressed bytes of one sample (sizes shards)."""
    h, w = settings.crop_px
    return (4 * h * w * (1 + len(settings.channels)) + h * w * len(MASKS) + 4 * OVERVIEW_SHAPE[0] * OVERVIEW_SHAPE[1]
            + 512)


def write_shard(path: Path, samples: list[dict], settings: PackSettings, cohort: str | None) -> None:
    """One shard: stacked arrays, one HDF5 chunk per sample, attributes naming everything."""
    import h5py

    h, w = settings.crop_px
    n = len(samples)
    comp = _compression_args(settings.compression)
    masks = [m for m in MASKS if m in settings.channels]
    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update({
            "format_version": FORMAT_VERSION, "created_by": f"bonedrr {__version__}", "cohort": cohort or "",
            "n_samples": n, "channels": json.dumps(list(settings.channels)), "masks": json.dumps(masks),
            "units": json.dumps({"xray": "as ingested (bone bright), not normalised", "drr": "g/cm2 (proximal_femur_thickness: cm)",
                                 "drr_bmd": "g/cm2", "qct_vbmd": "mg/cm3 HA", "dxa_abmd": "g/cm2",
                                 "kvp": "kV (DICOM KVP; NaN when not recorded)", "pixel_mm": "mm at the detector", "crop_box_px": "radiograph pixels"}),
            "settings": json.dumps(asdict(settings)), "orientation": "right hip (left hips mirrored left-right)",
        })

        def stack(name, key, dtype, chunked):
            data = np.stack([np.asarray(s[key]) for s in samples]).astype(dtype)
            kwargs = {"chunks": (1,) + data.shape[1:], **comp} if chunked else {}
            f.create_dataset(name, data=data, **kwargs)

        stack("xray", "xray", np.float32, True)
        stack("drr", "drr", np.float32, True)
        stack("mask", "mask", np.uint8, True)
        stack("overview", "overview", np.float32, True)
        for name, dtype in (("head_overview_px", np.float32), ("head_crop_px", np.float32),
                            ("crop_box_px", np.float64), ("pixel_mm", np.float64), ("world_to_camera", np.float64),
                            ("drr_bmd", np.float64), ("drr_bmd_full", np.float64), ("qct_vbmd", np.float64),
                            ("dxa_abmd", np.float64), ("kvp", np.float64), ("mirrored", np.uint8), ("fold", np.int16),
                            ("registration_similarity", np.float64), ("registration_converged", np.uint8)):
            key = {"drr_bmd": "drr_bmd_g_cm2", "drr_bmd_full": "drr_bmd_full_g_cm2", "qct_vbmd": "qct_vbmd_mg_cm3",
                   "dxa_abmd": "dxa_abmd_g_cm2"}.get(name, name)
            stack(name, key, dtype, False)
        for name in ("sample_id", "case_id", "patient_id", "side", "qa_flags", "geometry"):
            f.create_dataset(name, data=[s[name] for s in samples], dtype=strings)
        assert f["xray"].shape == (n, h, w)


def pack_cohort(case_dirs, out_dir: str | Path, settings: PackSettings | None = None,
                cohort: str | None = None) -> dict:
    """Pack a cohort's case folders into ``out_dir`` (shards, index.csv, splits.json, excluded.tsv,
    manifest.json), atomically. Returns the manifest.

    Cases missing a stage's output or whose registration failed QA are excluded and listed in
    excluded.tsv with the reason; a file that exists but cannot be read stops the pack (nothing is
    written).
    """
    from tqdm import tqdm

    settings = settings or PackSettings()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed pack
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; results are shared like any other folder
    try:
        manifest = _pack_into(sorted(map(Path, case_dirs)), tmp, settings, cohort, tqdm)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _pack_into(case_dirs: list[Path], tmp: Path, settings: PackSettings, cohort, tqdm) -> dict:
    per_shard = max(1, int(settings.shard_size_mb * 1e6 // sample_nbytes(settings)))
    index, excluded, shards, buffer = [], [], [], []

    def flush():
        if not buffer:
            return
        name = f"shard_{len(shards):05d}.h5"
        with atomic_path(tmp / name) as part:
            write_shard(part, buffer, settings, cohort)
        for row, s in enumerate(buffer):
            index.append({**{k: s[k] for k in INDEX_COLUMNS if k in s}, "shard": name, "row": row})
        shards.append({"file": name, "n_samples": len(buffer), "bytes": (tmp / name).stat().st_size,
                       "sha256": sha256_of(tmp / name)})
        buffer.clear()

    for case_dir in tqdm(case_dirs, desc="pack", unit="case", disable=len(case_dirs) < 2):
        try:
            samples, left_out = case_samples(case_dir, settings)
        except Excluded as e:
            excluded.append({"case_id": case_dir.name, "side": "both", "reason": str(e)})
            log.info("%s: excluded: %s", case_dir.name, e)
            continue
        excluded += left_out
        for s in samples:
            s["fold"] = fold_of(s["patient_id"], settings.folds, settings.seed)
            buffer.append(s)
            if len(buffer) == per_shard:
                flush()
    flush()
    if not index:
        raise BonedrrError(f"no case could be packed ({len(excluded)} excluded: "
                           f"{'; '.join(e['case_id'] + ': ' + e['reason'] for e in excluded[:3])})")

    with atomic_path(tmp / "index.csv") as part:
        with part.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in index:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(tmp / "excluded.tsv") as part:
        part.write_text("case_id\tside\treason\n" + "".join(f"{e['case_id']}\t{e['side']}\t{e['reason']}\n"
                                                           for e in excluded))
    folds = {str(k): {"patients": sorted({r["patient_id"] for r in index if r["fold"] == k}),
                      "samples": [r["sample_id"] for r in index if r["fold"] == k]} for k in range(settings.folds)}
    empty = [k for k, v in folds.items() if not v["samples"]]
    if empty:
        log.warning("fold(s) %s have no sample (%d patients for %d folds)", ", ".join(empty),
                    len({r["patient_id"] for r in index}), settings.folds)
    write_json(tmp / "splits.json", {"k": settings.folds, "seed": settings.seed,
                                     "rule": "fold = int.from_bytes(sha256(f'{seed}:{patient_id}')[:8], 'big') % k",
                                     "folds": folds})
    manifest = {
        "format_version": FORMAT_VERSION, "created_by": f"bonedrr {__version__}", "cohort": cohort,
        "n_samples": len(index), "n_excluded": len(excluded), "channels": list(settings.channels),
        "masks": [m for m in MASKS if m in settings.channels], "crop_px": list(settings.crop_px),
        "crop_mm": list(settings.crop_mm), "overview_px": list(OVERVIEW_SHAPE), "settings": asdict(settings),
        "shards": shards,
        "files": {n: sha256_of(tmp / n) for n in ("index.csv", "splits.json", "excluded.tsv")},
    }
    write_json(tmp / "manifest.json", manifest)  # last: a folder with a manifest is complete
    log.info("packed %d samples into %d shard(s) (%s); %d excluded", len(index), len(shards),
             settings.compression, len(excluded))
    return manifest


def verify(shard_dir: str | Path) -> list[str]:
    """Files of a packed folder whose SHA-256 differs from the manifest's (empty: all intact)."""
    shard_dir = Path(shard_dir)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    expected = {s["file"]: s["sha256"] for s in manifest["shards"]} | manifest["files"]
    return [name for name, digest in expected.items()
            if not (shard_dir / name).is_file() or sha256_of(shard_dir / name) != digest]
