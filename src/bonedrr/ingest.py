"""The ``ingest`` stage: one case's CT and radiograph, checked, into the pipeline's formats.

Writes, into the case's results folder:

* ``ct.nii.gz``: the CT in HU (float32), LPS world geometry as in the source;
* ``xray.nii.gz``: the radiograph (float32, bone bright) as a 2D image with its detector pixel
  spacing (x = column spacing, y = row spacing);
* ``case.json``: what later stages need to know (the radiograph's geometry prior, the side(s), the
  clinical values of the sample sheet, technical acquisition tags). It holds no identifying DICOM
  tag and no input path (folder names often carry patient names).

Example:
    >>> from bonedrr.ingest import ingest_case
    >>> ingest_case("case_1", "ct_dir", "xray.dcm", "results/c/case_1")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonedrr.dicom import read_ct_series, read_radiograph
from bonedrr.errors import InputError
from bonedrr.images import VOLUME_SUFFIXES, read_volume, suffix_of, write_image, write_json
from bonedrr.labels import LABEL_NAMES

log = logging.getLogger("bonedrr.ingest")

HU_PLAUSIBLE = (-1100.0, 30000.0)  # outside this (beyond noise and metal), values are not HU


def read_ct(path: str | Path) -> tuple[sitk.Image, dict]:
    """Read a CT from a DICOM folder or a volume file and check that it is a CT volume in HU."""
    path = Path(path)
    if path.is_dir():
        image, meta = read_ct_series(path)
        source = "dicom"
    elif path.is_file() and suffix_of(path) not in VOLUME_SUFFIXES:
        raise InputError(_single_file_problem(path), path)
    else:
        image = read_volume(path)
        meta, source = {}, suffix_of(path).lstrip(".")
        if source in ("nii", "nii.gz"):
            _check_nifti_finite(path)
        if image.GetDimension() != 3 or min(image.GetSize()) < 3:
            raise InputError(f"a {image.GetDimension()}D image of size {image.GetSize()}, not a CT volume", path)
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("a multi-component image, not a CT volume", path)
        image = sitk.Cast(image, sitk.sitkFloat32)
    check_ct_values(sitk.GetArrayViewFromImage(image), path)
    return image, {"format": source, **meta}


def _single_file_problem(path: Path) -> str:
    """Why a single non-volume file cannot be a CT (a radiograph, one DICOM slice, ...)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return f"not a CT: expected a DICOM folder or one of {', '.join(VOLUME_SUFFIXES)}"
    modality = str(ds.get("Modality", "")).upper() or "missing"
    if modality != "CT":
        return f"modality is {modality}, not CT"
    return "a single 2D DICOM image, not a CT volume (give the folder of the series)"


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader turns NaN into 0 without a word; look at the stored values with nibabel."""
    import nibabel

    data = np.asarray(nibabel.load(str(path)).dataobj)
    if np.issubdtype(data.dtype, np.floating):
        check_ct_values(data, path, ranges=False)


def check_ct_values(hu: np.ndarray, path, ranges: bool = True) -> None:
    """Raise InputError if the values cannot be a CT in Hounsfield units (or, ``ranges=False``, only
    if some are not finite)."""
    if not np.isfinite(hu).all():
        raise InputError(f"CT has {int((~np.isfinite(hu)).sum())} NaN or infinite voxels", path)
    if not ranges:
        return
    lo, hi = float(hu.min()), float(hu.max())
    if lo < -2048 or hi > HU_PLAUSIBLE[1]:
        raise InputError(f"absurd HU range {lo:.0f}..{hi:.0f}: not Hounsfield units", path)
    if lo > -200:
        raise InputError(f"no value below -200 (range {lo:.0f}..{hi:.0f}): not a CT in Hounsfield units "
                         "(unsigned data without its rescale intercept, or another modality?)", path)


def read_labels(path: str | Path, ct: sitk.Image) -> sitk.Image:
    """Read manual labels (canonical ids) and check they lie on the CT's grid."""
    labels = read_volume(path)
    if labels.GetSize() != ct.GetSize() or not (
            np.allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-3)
            and np.allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-2)
            and np.allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-4)):
        raise InputError(f"label grid (size {labels.GetSize()}, spacing {_fmt(labels.GetSpacing())}) differs "
                         f"from the CT's (size {ct.GetSize()}, spacing {_fmt(ct.GetSpacing())})", path)
    ids = np.unique(sitk.GetArrayViewFromImage(labels))
    unknown = [int(i) for i in ids if i != 0 and int(i) not in LABEL_NAMES]
    if unknown:
        raise InputError(f"label ids {unknown} are not canonical (1..{max(LABEL_NAMES)}); map them first", path)
    return sitk.Cast(labels, sitk.sitkUInt8)


def _fmt(v) -> str:
    return "x".join(f"{x:g}" for x in v)


def ingest_case(case_id: str, ct: str | Path, xray: str | Path, out_dir: str | Path, *, side: str = "both",
                labels: str | Path | None = None, pixel_mm=None, sdd_mm: float | None = None,
                clinical: dict | None = None, cohort: str | None = None) -> dict:
    """Ingest one case. Returns the content of case.json.

    Args:
        case_id: The case id (``[A-Za-z0-9_-]+``).
        ct: DICOM folder or NIfTI/MHA/NRRD file.
        xray: DICOM DX/CR or PNG/JPEG file.
        out_dir: The case's results folder.
        side: ``left``, ``right`` or ``both``: the hip(s) to measure.
        labels: Optional manual labels, checked to lie on the CT's grid with canonical ids (they stay
            where they are; ``case.json`` records that the case has them).
        pixel_mm: The cohort's default detector pixel [row, col] for radiographs without spacing.
        sdd_mm: The cohort's default source-to-detector distance for radiographs without it.
        clinical: Sample-sheet values to carry along (DXA/QCT BMD, scanner, and ``patient_id``, which
            becomes the record's top-level ``patient_id``; default the case id; ``xray_kvp``, the tube
            voltage of a radiograph whose file does not record it, becomes the record's ``xray.KVP``).
        cohort: The cohort's name.

    Raises:
        InputError: Naming the file and the problem.
    """
    out_dir = Path(out_dir)
    ct_image, ct_meta = read_ct(ct)
    label_image = read_labels(labels, ct_image) if labels else None
    radiograph = read_radiograph(xray, pixel_mm)
    sdd = radiograph.sdd_mm or sdd_mm
    if sdd is None:
        raise InputError("radiograph has no DistanceSourceToDetector and the cohort config sets no "
                         "xray.sdd_mm default", xray)
    rows, cols = radiograph.pixels.shape
    xray_image = sitk.GetImageFromArray(radiograph.pixels)
    xray_image.SetSpacing((radiograph.pixel_mm[1], radiograph.pixel_mm[0]))

    hu = sitk.GetArrayViewFromImage(ct_image)
    clinical = dict(clinical or {})
    technical = dict(radiograph.metadata)
    sheet_kvp = clinical.pop("xray_kvp", None)
    if "KVP" in technical:
        technical["kvp_source"] = "dicom"
        if sheet_kvp is not None and abs(float(sheet_kvp) - float(technical["KVP"])) > 0.5:
            log.warning("%s: the sample sheet's xray_kvp %s differs from the DICOM's KVP %s (the DICOM's is used)",
                        case_id, sheet_kvp, technical["KVP"])
    elif sheet_kvp is not None:
        technical.update({"KVP": float(sheet_kvp), "kvp_source": "sample sheet"})
    record = {
        "case_id": case_id, "patient_id": clinical.pop("patient_id", case_id), "cohort": cohort, "side": side,
        "clinical": clinical,
        "ct": {"size": list(ct_image.GetSize()), "spacing_mm": list(ct_image.GetSpacing()),
               "origin_mm": list(ct_image.GetOrigin()), "direction": list(ct_image.GetDirection()),
               "hu_range": [float(hu.min()), float(hu.max())], **ct_meta},
        "xray": {"rows": rows, "cols": cols, "pixel_mm": list(radiograph.pixel_mm),
                 "pixel_spacing_source": radiograph.spacing_source,
                 "sdd_source": "dicom" if radiograph.sdd_mm else "config",
                 "value_range": [float(radiograph.pixels.min()), float(radiograph.pixels.max())],
                 **technical},
        "geometry_prior": {"sdd_mm": float(sdd), "rows": rows, "cols": cols,
                           "pixel_mm": list(radiograph.pixel_mm),
                           "principal_point_px": [(rows - 1) / 2, (cols - 1) / 2],
                           "source_to_patient_mm": radiograph.sod_mm},
        "reference_labels": label_image is not None,
    }
    write_image(ct_image, out_dir / "ct.nii.gz")
    write_image(xray_image, out_dir / "xray.nii.gz")
    write_json(out_dir / "case.json", record)
    return record


def ingest_overview(case_dirs: list[str | Path], png: str | Path, table: str | Path) -> None:
    """A cohort's ingested cases at a glance: one row per case in a TSV, and a contact sheet (CT
    coronal maximum-intensity projection beside the radiograph as ingested, bone bright)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bonedrr.images import atomic_path

    case_dirs = [Path(d) for d in case_dirs]
    lines = ["case_id\tct_format\tct_size\tct_spacing_mm\txray_rows\txray_cols\tpixel_mm\tpixel_spacing_source\t"
             "sdd_mm\tsdd_source\tphotometric\tside"]
    n = len(case_dirs)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.4 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, d in enumerate(case_dirs):
        record = json.loads((d / "case.json").read_text())
        ct, x, g = record["ct"], record["xray"], record["geometry_prior"]
        lines.append("\t".join(str(v) for v in [
            record["case_id"], ct["format"], "x".join(map(str, ct["size"])),
            "x".join(f"{s:.3g}" for s in ct["spacing_mm"]), x["rows"], x["cols"],
            "x".join(f"{s:.4g}" for s in x["pixel_mm"]), x["pixel_spacing_source"], g["sdd_mm"], x["sdd_source"],
            x.get("PhotometricInterpretation", x.get("format", "")), record["side"]]))
        volume = sitk.DICOMOrient(sitk.ReadImage(str(d / "ct.nii.gz")), "LPS")
        mip = sitk.GetArrayFromImage(volume).max(axis=1)[::-1]  # superior up, patient's right on the left
        sx, _, sz = volume.GetSpacing()
        radiograph = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "xray.nii.gz")))
        lo, hi = np.percentile(radiograph, [0.5, 99.5])
        a, b = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        a.imshow(mip, cmap="gray", vmin=-200, vmax=1500, aspect=sz / sx)
        b.imshow(radiograph, cmap="gray", vmin=lo, vmax=hi)
        a.set_title(f"{record['case_id']} CT (MIP)", fontsize=8)
        b.set_title(f"radiograph ({x.get('PhotometricInterpretation', x.get('format', ''))})", fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=70)
    plt.close(fig)
    with atomic_path(table) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
