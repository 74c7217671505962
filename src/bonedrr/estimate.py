"""``bonedrr estimate``: what a clinic would run. One radiograph in, BMD and the decomposed bone image out.

The radiograph (DICOM DX/CR, PNG or JPEG, read by :func:`bonedrr.dicom.read_radiograph`: bone bright,
pixel spacing from the tags or ``--pixel-mm``) is either a full AP pelvis radiograph, in which the
model's hip locator finds each femoral head, or a hip crop (``--crop``). Each hip is cut out exactly
as the training shards were (:func:`bonedrr.shards.crop_grid`: the same physical size, the head at the
same place, a left hip mirrored), decomposed, and its BMD read from the predicted proximal-femur DRR
as from a true one (:func:`bonedrr.bmd.drr_bmd`). With a DXA calibration in the model, the
DXA-equivalent aBMD too; with a young-adult reference, the T-score. A model that predicts the proximal
femur's thickness also gives its volumetric density, DRR-vBMD in mg/cm3 (:func:`bonedrr.bmd.drr_vbmd`,
the quantity QCT measures; the rendered density clips bone voxels at 0, so it runs a few % above a QCT
workstation's mean).

On a CPU the model runs from its torch-free copy (``model.npz``, :mod:`bonedrr.model.portable`), so a
call does not pay for importing torch.

Nothing identifying is written: the outputs hold numbers, the model's folder name and pictures of the
crops, never a DICOM tag or the input's path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from bonedrr.bmd import BMD_CHANNEL
from bonedrr.dicom import RASTER_SUFFIXES, read_radiograph
from bonedrr.errors import InputError
from bonedrr.images import atomic_path, write_json

log = logging.getLogger(__name__)
SIDES = ("right", "left")
#: Below this locator confidence (heatmap mass near the peak) the hip position is reported as uncertain.
LOW_CONFIDENCE = 0.3


def hip_crops(model, pixels: np.ndarray, pixel_mm, sides, crop_input: bool):
    """The model's input for each requested hip of a radiograph, cut as the shards were.

    Args:
        model: A :class:`bonedrr.model.portable.HipModel` (torch or NumPy).
        pixels: The radiograph (rows, cols), bone bright.
        pixel_mm: Its detector pixel (row, col), mm.
        sides: ``["right"]``, ``["left"]`` or both.
        crop_input: ``pixels`` is already a hip crop (one side; resized to the model's crop shape,
            a left hip mirrored).

    Returns:
        (crops (N, H, W), per side: how it was found: ``femoral_head_px``, ``crop_box_px``,
        ``locator_confidence`` for a full radiograph).

    Raises:
        InputError: A crop given for both sides, or a hip the locator cannot place.
    """
    from bonedrr.shards import crop_grid, resample

    facts = {}
    if crop_input:
        if len(sides) != 1:
            raise InputError("a hip crop is one hip: give --side left or --side right with --crop")
        image = pixels[:, ::-1] if sides[0] == "left" else pixels
        h, w = model.crop_shape
        rows = (np.arange(h) + 0.5) * image.shape[0] / h - 0.5
        cols = (np.arange(w) + 0.5) * image.shape[1] / w - 0.5
        zoom = (image.shape[0] / h, image.shape[1] / w)
        facts[sides[0]] = {"input": "crop"}
        return resample(np.ascontiguousarray(image), rows, cols, zoom)[None], facts
    heads, confidence = model.locate_hips_with_confidence(pixels, pixel_mm)
    crops = []
    for side in sides:
        head = heads[side]
        if not all(np.isfinite(head)):
            raise InputError(f"the {side} hip was not found in the radiograph")
        grid = crop_grid(head, side, pixel_mm, model.crop.pack_settings)
        crops.append(resample(pixels, grid["rows"], grid["cols"], grid["zoom"]))
        facts[side] = {"input": "full radiograph", "femoral_head_px": [round(v, 1) for v in head],
                       "crop_box_px": grid["box_px"], "locator_confidence": round(confidence[side], 3)}
    return np.stack(crops), facts


def estimate(model_dir: str | Path, xray: str | Path, side: str = "both", out_dir: str | Path | None = None,
             pixel_mm=None, crop: bool = False, t_reference: tuple[float, float] | None = None,
             device: str = "cpu", threads: int | None = None, kvp: float | None = None) -> dict:
    """BMD of the hip(s) in one radiograph.

    Args:
        model_dir: A trained model folder (``results/models/<name>``).
        xray: The radiograph: DICOM DX/CR, PNG or JPEG.
        side: ``left``, ``right`` or ``both``.
        out_dir: Where to write ``estimate.json`` and per hip ``<side>_decomposition.png`` (picture)
            and ``<side>_drr.nii.gz`` (the predicted channels, g/cm2); None writes nothing.
        pixel_mm: Detector pixel (row, col) mm for files without spacing tags (PNG/JPEG).
        crop: The image is a hip crop (one side), not a full radiograph.
        t_reference: (mean, sd) of young-adult aBMD, g/cm2: adds a T-score (of the DXA-equivalent value
            when the model has a DXA calibration, else of the DRR-BMD).
        device: ``cpu`` (the model's torch-free copy where it has one: :func:`load_for_inference`),
            ``cuda`` or ``auto``.
        threads: CPU threads of a torch model (the torch-free one's BLAS follows ``OMP_NUM_THREADS``).
        kvp: The tube voltage (kV) of a radiograph whose file does not record it (PNG/JPEG, a DICOM without
            KVP); a DICOM's own KVP wins. A model trained with ``network condition: kvp`` needs one of them.

    Returns:
        The result record (also ``estimate.json``).

    Raises:
        InputError: Missing or unreadable model or image, a hip that cannot be found.
    """
    return estimate_many(model_dir, [xray], side, [out_dir], pixel_mm, crop, t_reference, device, threads, kvp)[0]


def estimate_many(model_dir: str | Path, xrays: list, side: str = "both", out_dirs: list | None = None,
                  pixel_mm=None, crop: bool = False, t_reference: tuple[float, float] | None = None,
                  device: str = "cpu", threads: int | None = None, kvp: float | None = None) -> list[dict]:
    """:func:`estimate` for several radiographs with the model loaded once (python's start and the model
    load take a few tenths of a second, torch's import where the torch model is used a few seconds).

    Args:
        xrays: The radiographs.
        out_dirs: One output folder (or None) per radiograph; None writes nothing.
        model_dir, side, pixel_mm, crop, t_reference, device, threads, kvp: As for :func:`estimate`.

    Returns:
        One result record per radiograph, in order; ``seconds`` of each counts its own work, the first
        also the model load.
    """
    t0 = time.perf_counter()
    xrays = [Path(x) for x in xrays]
    for xray in xrays:  # every input checked before the model loads
        if not xray.is_file():
            raise InputError("radiograph file not found", xray)
        if xray.suffix.lower() in RASTER_SUFFIXES and pixel_mm is None and not crop:
            raise InputError("a PNG/JPEG has no pixel spacing: give --pixel-mm ROW COL (mm at the detector)", xray)
    model = load_for_inference(model_dir, device, threads)
    out_dirs = out_dirs or [None] * len(xrays)
    results = []
    for xray, out_dir in zip(xrays, out_dirs):
        results.append(_estimate_one(model, Path(model_dir).name, xray, side, out_dir, pixel_mm, crop,
                                     t_reference, t0, kvp))
        t0 = time.perf_counter()
    return results


def load_for_inference(model_dir: str | Path, device: str = "cpu", threads: int | None = None):
    """The model folder's torch-free copy (:class:`bonedrr.model.portable.PortableModel`, ``model.npz``)
    for the CPU, which spares the call torch's import; the torch model for a GPU, ``auto``, or a folder
    without an up-to-date ``model.npz`` (trained before it existed). ``threads``: the torch model's CPU
    threads.

    Raises:
        InputError: Missing or unreadable model.
    """
    from bonedrr.model.portable import load_portable, portable_path

    npz = portable_path(model_dir) if device == "cpu" else None
    if npz is not None:
        return load_portable(npz)
    import torch

    from bonedrr.train import load_model

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(model_dir, device=device)


def _tube_voltage(radiograph, given: float | None, xray: Path, needed: bool) -> tuple[float | None, str | None]:
    """(kVp, where it came from): the DICOM's KVP, else ``given`` (``--kvp``); an error where the model
    needs it and neither has it."""
    if "KVP" in radiograph.metadata:
        kvp = float(radiograph.metadata["KVP"])
        if given is not None and abs(given - kvp) > 0.5:
            log.warning("%s: --kvp %s differs from the DICOM's KVP %s (the DICOM's is used)", xray.name, given, kvp)
        return kvp, "dicom"
    if given is not None:
        return float(given), "--kvp"
    if needed:
        raise InputError("this model is conditioned on the tube voltage and the radiograph does not record it "
                         "(no DICOM KVP): give --kvp KV", xray)
    return None, None


def _check_open_beam(model, pixels: np.ndarray, xray: Path) -> None:
    """Warn when a radiograph cannot be on the scale of a model that reads density from a fixed open beam
    (train ``open_beam``; :func:`bonedrr.model.portable.below_open_beam`)."""
    from bonedrr.model.portable import below_open_beam

    open_beam = getattr(model, "open_beam", None)
    if model.input_scale != "detector" or open_beam is None:
        return
    darkest = below_open_beam(pixels, open_beam, model.input_span)
    if darkest is not None:
        log.warning("%s: its darkest values (%.0f, the 0.1st percentile) lie below the model's open beam (%g): they "
                    "are not referenced to that open beam (another dose reference or detector), and the model reads "
                    "density from it, so its BMD is off", xray.name, darkest, open_beam)


def _estimate_one(model, model_name: str, xray: Path, side: str, out_dir, pixel_mm, crop: bool, t_reference,
                  t0: float, kvp: float | None = None) -> dict:
    radiograph = read_radiograph(xray, default_pixel_mm=pixel_mm or (1.0, 1.0))
    kvp, kvp_source = _tube_voltage(radiograph, kvp, xray, model.needs_kvp)
    sides = list(SIDES) if side == "both" else [side]
    crops, facts = hip_crops(model, radiograph.pixels, radiograph.pixel_mm, sides, crop)
    if model.input_scale == "detector" and "format" in radiograph.metadata:  # PNG or JPEG: no tag tells
        log.warning("%s: the model reads raw radiographs on its detector's log scale (input_scale detector), and a "
                    "%s file does not say which scale its values are on: its BMD is only right if they are on that "
                    "one", xray.name, radiograph.metadata["format"].upper())
    elif model.input_scale == "detector" and radiograph.metadata.get("PresentationIntentType") != "FOR PROCESSING":
        log.warning("%s: the model reads raw radiographs on its detector's log scale (input_scale detector), and this "
                    "is not a DICOM 'FOR PROCESSING' image: its BMD is only right if its values are on that scale",
                    xray.name)
    _check_open_beam(model, radiograph.pixels, xray)
    if crop and model.input_scale != "crop" and getattr(model, "open_beam", None) is None:  # an open beam fixes it
        log.warning("%s: a hip crop has no whole radiograph around it; the model's input scale (taken from "
                    "the whole radiograph in training) comes from the crop itself, which biases BMD", xray.name)
    scale = model.scale_of(model.overview_of(radiograph.pixels, radiograph.pixel_mm)[None])
    prediction = model.predict(crops, scale, kvp=kvp)
    bmd = model.bmd(prediction)
    vbmd = model.vbmd(prediction)
    calibrated = model.calibrated(bmd)
    result = {"model": model_name, "units": "g/cm2", "pixel_mm": list(radiograph.pixel_mm),
              "pixel_spacing_source": radiograph.spacing_source, "kvp": kvp, "kvp_source": kvp_source, "sides": {}}
    for i, s in enumerate(sides):
        record = {"drr_bmd_g_cm2": _round(bmd[i]), **facts[s]}
        if vbmd is not None:
            record["drr_vbmd_mg_cm3"] = _round(vbmd[i], 1)
        if calibrated is not None:
            record["dxa_equivalent_abmd_g_cm2"] = _round(calibrated[i])
        if t_reference is not None:
            value = calibrated[i] if calibrated is not None else bmd[i]
            record["t_score"] = _round((value - t_reference[0]) / t_reference[1], 2)
            record["t_score_of"] = "dxa_equivalent_abmd_g_cm2" if calibrated is not None else "drr_bmd_g_cm2"
        result["sides"][s] = record
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        out_dir = Path(out_dir)
        k = model.channels.index(BMD_CHANNEL)
        for i, s in enumerate(sides):
            png, nii = out_dir / f"{s}_decomposition.png", out_dir / f"{s}_drr.nii.gz"
            _picture(png, crops[i], prediction[i], model.channels, k, s, bmd[i])
            _write_drr(nii, prediction[i], model.crop.pack_settings.crop_pixel_mm)
            result["sides"][s]["files"] = [png.name, nii.name]
        write_json(out_dir / "estimate.json", result)
    return result


_crops = hip_crops  # the name bonedrr.validate imports


def _round(v, digits: int = 4):
    return None if not np.isfinite(v) else round(float(v), digits)


def describe(result: dict) -> str:
    """The result as text, one line per hip."""
    lines = []
    for s, r in result["sides"].items():
        b = r["drr_bmd_g_cm2"]
        text = f"{s} hip: BMD {b:.3f} g/cm2 (DRR-BMD)" if b is not None else f"{s} hip: BMD not measurable"
        if r.get("drr_vbmd_mg_cm3") is not None:
            text += f", vBMD {r['drr_vbmd_mg_cm3']:.0f} mg/cm3 (DRR-vBMD)"
        if r.get("dxa_equivalent_abmd_g_cm2") is not None:
            text += f", DXA-equivalent aBMD {r['dxa_equivalent_abmd_g_cm2']:.3f} g/cm2"
        if r.get("t_score") is not None:
            text += f", T-score {r['t_score']:+.1f}"
        if r.get("locator_confidence") is not None and r["locator_confidence"] < LOW_CONFIDENCE:
            text += f" (hip position uncertain: locator confidence {r['locator_confidence']:.2f})"
        lines.append(text)
    return "\n".join(lines)


def _picture(path: Path, crop: np.ndarray, prediction: np.ndarray, channels: list[str], k: int, side: str,
             bmd: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k] + [channels.index(c) for c in ("bone", "femur", "pelvis") if c in channels]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(1.6 * (1 + len(shown)), 3.3))
    lo, hi = np.percentile(crop, [1, 99])
    axes[0].imshow(crop, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title(f"{side} hip" + (" (mirrored)" if side == "left" else ""), fontsize=8)
    for ax, j in zip(axes[1:], shown):
        ax.imshow(prediction[j], cmap="magma", vmin=0)
        ax.set_title(channels[j] + (f"\nBMD {bmd:.3f} g/cm2" if j == k and np.isfinite(bmd) else ""), fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _write_drr(path: Path, prediction: np.ndarray, crop_pixel_mm) -> None:
    """The predicted channels (C, H, W) as a NIfTI volume, one slice per channel, g/cm2 (a thickness: cm)."""
    import SimpleITK as sitk

    from bonedrr.images import write_image

    image = sitk.GetImageFromArray(prediction.astype(np.float32))
    image.SetSpacing((float(crop_pixel_mm[1]), float(crop_pixel_mm[0]), 1.0))
    write_image(image, path)
