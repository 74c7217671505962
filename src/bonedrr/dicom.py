"""DICOM and radiograph-file I/O: CT series and projection radiographs, checked and de-identified.

Reading is strict: each problem a real archive has (truncated files, missing slices, two series in
one folder, the wrong modality, no pixel spacing) is an :class:`~bonedrr.errors.InputError` naming
the file and the problem. What is kept of a header is a whitelist of technical tags
(:data:`TECHNICAL_TAGS`): nothing that identifies a patient, a study or an institution (names, ids,
dates, UIDs, addresses, free text) is ever returned, following the DICOM basic application level
confidentiality profile (PS3.15 E.1), whose tags are all outside the whitelist.

Writing (used by the demo cohort to produce data as users have it) makes CT Image Storage series
and Digital X-Ray "for presentation" images with the tags a real modality fills in.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bonedrr.errors import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
RADIOGRAPH_MODALITIES = ("DX", "CR", "RG")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")

#: The only header values that leave this module: technical, never identifying.
TECHNICAL_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
    "SliceThickness", "ExposureTime", "XRayTubeCurrent", "Exposure", "ExposureInuAs",
    "BodyPartExamined", "ViewPosition", "PatientOrientation", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "ImagerPixelSpacing", "PixelSpacing", "DistanceSourceToDetector", "DistanceSourceToPatient",
    "EstimatedRadiographicMagnificationFactor", "FilterType", "Grid", "PresentationIntentType",
    "PixelIntensityRelationship",
)


def technical_metadata(ds: Dataset) -> dict:
    """The whitelisted technical tags present in ``ds``, as JSON-ready values."""
    out = {}
    for name in TECHNICAL_TAGS:
        value = ds.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            value = [_plain(v) for v in value]
        out[name] = _plain(value)
    return out


def _plain(v):
    if isinstance(v, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal, float)):
        return float(v)
    if isinstance(v, (pydicom.valuerep.IS, int)):
        return int(v)
    return str(v)


def _read(path: Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise InputError("not a DICOM file (no DICM preamble)", path) from e
    except Exception as e:  # pydicom raises many types on damaged files
        raise InputError(f"unreadable or truncated DICOM ({type(e).__name__}: {e})", path) from e


def _numbers(ds: Dataset, keyword: str, path: Path, *, count: int | None = None, positive: bool = False,
             integer: bool = False) -> tuple | None:
    """A numeric element's values, checked (``None`` when absent or empty).

    pydicom parses element values lazily, so a damaged header only fails when a value is used: each
    value the readers use goes through here, and any failure names the element.
    """
    try:
        raw = ds.get(keyword)
        if raw is None or raw == "":
            return None
        values = list(raw) if isinstance(raw, (pydicom.multival.MultiValue, list, tuple)) else [raw]
        converted = tuple((int(str(v).strip()) if integer else float(v)) for v in values)
    except Exception:
        raise InputError(f"malformed {keyword} ({_shown(ds, keyword)})", path) from None
    if count is not None and len(converted) != count:
        raise InputError(f"malformed {keyword}: {len(converted)} values, expected {count}", path)
    if not all(np.isfinite(converted)) or (positive and min(converted) <= 0):
        raise InputError(f"implausible {keyword} ({_shown(ds, keyword)})", path)
    return converted


def _number(ds: Dataset, keyword: str, path: Path, default=None, **kwargs):
    values = _numbers(ds, keyword, path, count=None, **kwargs)
    if values is None:
        return default
    if len(values) != 1:
        raise InputError(f"malformed {keyword}: {len(values)} values, expected 1", path)
    return values[0]


def _shown(ds: Dataset, keyword: str) -> str:
    """An element's raw value for an error message, short (only technical elements are ever shown)."""
    try:
        text = repr(ds.get(keyword))
    except Exception:
        text = "unparseable"
    return text if len(text) <= 40 else text[:37] + "..."


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values, after checking that the pixel data is present and complete."""
    if "PixelData" not in ds:
        raise InputError("DICOM file has no pixel data", path)
    rows, cols = _number(ds, "Rows", path, positive=True, integer=True), \
        _number(ds, "Columns", path, positive=True, integer=True)
    bits = _number(ds, "BitsAllocated", path, positive=True, integer=True)
    if rows is None or cols is None or bits is None:
        raise InputError("DICOM image lacks Rows, Columns or BitsAllocated", path)
    try:
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed
        pixel_bytes = len(ds.PixelData)
    except Exception as e:
        raise InputError(f"malformed transfer syntax or pixel data ({type(e).__name__})", path) from None
    if compressed is False:
        expected = rows * cols * (_number(ds, "SamplesPerPixel", path, 1, positive=True, integer=True)) \
            * (_number(ds, "NumberOfFrames", path, 1, positive=True, integer=True)) * (bits // 8)
        if pixel_bytes < expected:
            raise InputError(f"truncated DICOM: pixel data has {pixel_bytes} of {expected} bytes", path)
    try:
        return ds.pixel_array
    except Exception as e:
        raise InputError(f"cannot decode pixel data ({type(e).__name__}: {e})", path) from e


# ---------------------------------------------------------------------------------------------
# CT series


def dicom_files(folder: Path) -> list[Path]:
    """Files of a DICOM folder (recursively), skipping hidden files and DICOMDIR."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def read_ct_series(folder: str | Path, min_slices: int = 3) -> tuple[sitk.Image, dict]:
    """Read one CT series from a folder into an LPS volume in HU.

    Slices are sorted by their position along the slice normal (not by file name or instance
    number); the spacing between them must be even (a gap is reported as missing slices).

    Args:
        folder: A folder holding exactly one CT series.
        min_slices: Fewer slices than this is not a volume.

    Returns:
        The volume (float32 HU) and the technical metadata of its first slice.

    Raises:
        InputError: Naming the folder or the file and what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("CT folder not found", folder)
    try:
        return _read_ct_series(folder, min_slices)
    except InputError:
        raise
    except Exception as e:  # a damaged header that no specific check caught: still the input's fault
        raise InputError(f"malformed DICOM series ({type(e).__name__}: {e})", folder) from None


def _read_ct_series(folder: Path, min_slices: int) -> tuple[sitk.Image, dict]:
    files = dicom_files(folder)
    if not files:
        raise InputError("folder holds no DICOM files", folder)
    headers = [(f, _read(f)) for f in files]  # one read per file: the pixel data is decoded later
    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        described = ", ".join(f"series number {group[0][1].get('SeriesNumber', '?')} ({len(group)} files)"
                              for group in series.values())
        raise InputError(f"folder holds {len(series)} series ({described}); give each series its own folder",
                         folder)
    modality = str(headers[0][1].get("Modality", "")).upper()
    if modality != "CT":
        raise InputError(f"modality is {modality or 'missing'}, not CT", headers[0][0])
    if len(files) < min_slices:
        raise InputError(f"a single 2D image ({len(files)} file), not a CT volume", folder)

    geometry = []  # per slice: orientation (6), position (3), pixel spacing (2), rows, columns
    for f, ds in headers:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise InputError(f"CT slice lacks {tag}", f)
        geometry.append((np.asarray(_numbers(ds, "ImageOrientationPatient", f, count=6)),
                         np.asarray(_numbers(ds, "ImagePositionPatient", f, count=3)),
                         _numbers(ds, "PixelSpacing", f, count=2, positive=True),
                         _number(ds, "Rows", f, positive=True, integer=True),
                         _number(ds, "Columns", f, positive=True, integer=True)))
    iop = geometry[0][0]
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InputError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors", headers[0][0])
    for (f, _), g in zip(headers, geometry):
        if not np.allclose(g[0], iop, atol=1e-4):
            raise InputError("slice orientation differs from the rest of the series", f)
        if g[3:] != geometry[0][3:]:
            raise InputError("slice size differs from the rest of the series", f)

    positions = np.array([np.dot(g[1], normal) for g in geometry])
    order = np.argsort(positions)
    headers = [headers[i] for i in order]
    geometry = [geometry[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 1e-3:
        raise InputError("several slices share one position", folder)
    for i, gap in enumerate(gaps):
        if abs(gap - step) > max(0.01 * step, 0.01):
            where = f"between {headers[i][0].name} and {headers[i + 1][0].name}"
            n_missing = round(gap / step) - 1
            if n_missing >= 1 and abs(gap - (n_missing + 1) * step) < 0.05 * step:
                raise InputError(f"{n_missing} missing slice(s) {where} (gap {gap:.2f} mm, spacing {step:.2f} mm)",
                                 folder)
            if gap < 1e-3:
                raise InputError(f"two slices at the same position: {where}", folder)
            raise InputError(f"uneven slice spacing: {gap:.2f} mm {where}, {step:.2f} mm elsewhere", folder)

    slices = []
    for f, ds in headers:
        stored = _pixels(ds, f)
        if stored.ndim != 2:
            raise InputError("CT slice is not a single 2D frame", f)
        slope, intercept = _number(ds, "RescaleSlope", f, 1.0), _number(ds, "RescaleIntercept", f, 0.0)
        slices.append(stored.astype(np.float32) * slope + intercept)
    first = headers[0][1]
    if any(s.shape != slices[0].shape for s in slices):
        raise InputError("slice pixel data size differs from the rest of the series", folder)
    image = sitk.GetImageFromArray(np.stack(slices))
    spacing_rc = geometry[0][2]
    image.SetSpacing((spacing_rc[1], spacing_rc[0], step))
    image.SetOrigin(tuple(float(v) for v in geometry[0][1]))
    image.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel()))
    return image, technical_metadata(first)


# ---------------------------------------------------------------------------------------------
# Radiographs


@dataclass
class Radiograph:
    """A projection radiograph as ingested.

    Args:
        pixels: float32 (rows, cols); larger values mean more attenuation (MONOCHROME2 sense).
        pixel_mm: [row spacing, column spacing] at the detector plane, mm.
        spacing_source: Where ``pixel_mm`` came from: ``ImagerPixelSpacing``, ``PixelSpacing``,
            or ``config`` (the cohort's default).
        sdd_mm: Source-to-detector distance if the file has it, else None.
        sod_mm: Source-to-patient distance if the file has it, else None.
        metadata: Technical, non-identifying tags (DICOM) or format facts (PNG/JPEG).
    """

    pixels: np.ndarray
    pixel_mm: tuple[float, float]
    spacing_source: str
    sdd_mm: float | None = None
    sod_mm: float | None = None
    metadata: dict = field(default_factory=dict)


def read_radiograph(path: str | Path, default_pixel_mm=None) -> Radiograph:
    """Read a radiograph from DICOM (DX, CR) or PNG/JPEG.

    DICOM pixel spacing is taken from ImagerPixelSpacing (at the detector, what the projection
    geometry needs), else PixelSpacing, else ``default_pixel_mm``. MONOCHROME1 images are inverted so
    that bone is always bright. PNG and JPEG carry no spacing: ``default_pixel_mm`` is required.

    Args:
        path: The radiograph file.
        default_pixel_mm: [row, col] spacing to use where the file has none (the cohort's
            ``xray.pixel_mm``), or None.

    Raises:
        InputError: Naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("radiograph file not found", path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _read_raster(path, default_pixel_mm)
    try:
        return _read_radiograph_dicom(path, default_pixel_mm)
    except InputError:
        raise
    except Exception as e:  # a damaged header that no specific check caught: still the file's fault
        raise InputError(f"malformed DICOM header ({type(e).__name__}: {e})", path) from None


def _read_radiograph_dicom(path: Path, default_pixel_mm) -> Radiograph:
    ds = _read(path)
    modality = str(ds.get("Modality", "")).upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise InputError(f"modality is {modality or 'missing'}, not a radiograph ({'/'.join(RADIOGRAPH_MODALITIES)})",
                         path)
    if _number(ds, "NumberOfFrames", path, 1, integer=True) > 1:
        raise InputError("multi-frame DICOM: a radiograph must be a single frame", path)
    if _number(ds, "SamplesPerPixel", path, 1, integer=True) != 1:
        raise InputError("colour DICOM: a radiograph must be greyscale", path)
    stored = _pixels(ds, path)
    if stored.ndim != 2:
        raise InputError(f"pixel data has shape {stored.shape}, not one 2D frame", path)
    stored = stored.astype(np.float32)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        bits = _number(ds, "BitsStored", path, None, positive=True, integer=True) or \
            _number(ds, "BitsAllocated", path, positive=True, integer=True)
        if not 1 <= bits <= 32:
            raise InputError(f"implausible BitsStored ({bits})", path)
        lo = -(2 ** (bits - 1)) if _number(ds, "PixelRepresentation", path, 0, integer=True) else 0
        stored = (lo + 2 ** bits - 1) - stored + lo
    elif photometric != "MONOCHROME2":
        raise InputError(f"photometric interpretation {photometric}: a radiograph must be MONOCHROME1/2", path)
    pixels = stored * _number(ds, "RescaleSlope", path, 1.0) + _number(ds, "RescaleIntercept", path, 0.0)
    imager = _numbers(ds, "ImagerPixelSpacing", path, count=2, positive=True)
    plain = None if imager else _numbers(ds, "PixelSpacing", path, count=2, positive=True)
    if imager:
        pixel_mm, source = imager, "ImagerPixelSpacing"
    elif plain:
        pixel_mm, source = plain, "PixelSpacing"
    elif default_pixel_mm is not None:
        pixel_mm, source = tuple(float(v) for v in default_pixel_mm), "config"
    else:
        raise InputError("radiograph has no ImagerPixelSpacing or PixelSpacing and the cohort config sets "
                         "no xray.pixel_mm default", path)
    sdd = _number(ds, "DistanceSourceToDetector", path, positive=True)
    sod = _number(ds, "DistanceSourceToPatient", path, positive=True)
    if sdd is not None and sod is not None and sod >= sdd:
        raise InputError(f"DistanceSourceToPatient ({sod:g} mm) is not shorter than DistanceSourceToDetector "
                         f"({sdd:g} mm)", path)
    return Radiograph(pixels.astype(np.float32), pixel_mm, source, sdd, sod, technical_metadata(ds))


def _read_raster(path: Path, default_pixel_mm) -> Radiograph:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Exception as e:
        raise InputError(f"unreadable image ({type(e).__name__}: {e})", path) from e
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError("colour image: a radiograph must be greyscale", path)
        arr = arr[..., 0]
    if default_pixel_mm is None:
        raise InputError("PNG/JPEG has no pixel spacing and the cohort config sets no xray.pixel_mm default", path)
    meta = {"format": path.suffix.lower().lstrip("."), "mode": mode, "bits": int(arr.dtype.itemsize * 8)}
    return Radiograph(arr.astype(np.float32), tuple(float(v) for v in default_pixel_mm), "config",
                      metadata=meta)


# ---------------------------------------------------------------------------------------------
# Writing (the demo cohort)


def _base_dataset(sop_class: str, sop_instance: str, patient: dict, study_uid: str, series_uid: str,
                  modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    for key, value in patient.items():  # PatientName, PatientID, PatientBirthDate, ... (demo PHI)
        setattr(ds, key, value)
    ds.StudyDate = ds.SeriesDate = patient.get("StudyDate", datetime.date.today().strftime("%Y%m%d"))
    ds.Manufacturer = "bonedrr virtual scanner"
    return ds


def uid(*entropy) -> str:
    """A deterministic DICOM UID from the given values (so reruns write identical files)."""
    return generate_uid(entropy_srcs=[str(e) for e in entropy])


def write_ct_series(folder: str | Path, image: sitk.Image, patient: dict, key: str,
                    series_description: str = "virtual CT", kernel: str = "B30f", kvp: float = 120.0) -> None:
    """Write an HU volume as a CT Image Storage series, one file per slice.

    The volume is first oriented to an identity direction (axial, LPS), as scanners write it.

    Args:
        folder: Output folder (created; should be empty).
        image: HU volume.
        patient: Patient-level tags to fill in (e.g. PatientName, PatientID, PatientBirthDate).
        key: A string that makes the UIDs unique and reproducible (e.g. cohort/case).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.DICOMOrient(image, "LPS")
    hu = sitk.GetArrayFromImage(image)
    # Unsigned storage with the usual -1024 intercept, lowered if the volume goes below it.
    intercept = float(min(-1024.0, np.floor(hu.min())))
    if hu.max() - intercept > 65535:
        raise ValueError(f"HU range {hu.min():.0f}..{hu.max():.0f} does not fit 16 bits")
    stored = np.round(hu - intercept).astype(np.uint16)
    sx, sy, sz = image.GetSpacing()
    study_uid, series_uid = uid(key, "study"), uid(key, "ct-series")
    for k in range(stored.shape[0]):
        ds = _base_dataset(CT_IMAGE_STORAGE, uid(key, "ct", k), patient, study_uid, series_uid, "CT")
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.SeriesDescription, ds.ConvolutionKernel, ds.KVP = series_description, kernel, kvp
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"CT{k + 1:04d}.dcm", enforce_file_format=True)


def write_radiograph_dicom(path: str | Path, stored: np.ndarray, pixel_mm, sdd_mm: float, sod_mm: float,
                           patient: dict, key: str, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                           kvp: float = 80.0, raw: bool = False) -> None:
    """Write a DX "for presentation" image (or with ``raw``, a "for processing" one: the detector's
    log signal, pixel intensity relationship LOG) with its spacing and distance tags.

    Args:
        stored: Stored pixel values (rows, cols), unsigned, already inverted for MONOCHROME1.
        pixel_mm: ImagerPixelSpacing [row, col] at the detector.
        sdd_mm: DistanceSourceToDetector.
        sod_mm: DistanceSourceToPatient.
        bits_stored: 8, 12 or 16.
    """
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    if stored.max() >= 2 ** bits_stored or stored.min() < 0:
        raise ValueError(f"stored values outside {bits_stored} bits")
    ds = _base_dataset(DX_PROCESSING_STORAGE if raw else DX_PRESENTATION_STORAGE, uid(key, "dx"), patient,
                       uid(key, "dx-study"), uid(key, "dx-series"), "DX")
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if raw else ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PROCESSING" if raw else "FOR PRESENTATION"
    if raw:  # sign -1: larger stored values, less beam (MONOCHROME1 stores the inverse)
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "PELVIS", "AP", ["L", "F"]
    ds.KVP = kvp
    ds.ImagerPixelSpacing = [float(v) for v in pixel_mm]
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = float(sdd_mm), float(sod_mm)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.PixelData = stored.astype(dtype).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
