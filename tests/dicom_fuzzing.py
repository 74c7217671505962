"""Mutations of valid DICOM files for fuzzing the readers (tests/test_fuzz_dicom.py, and the long runs
of scripts/fuzz_dicom.py). A reader passes when every mutant is either read or refused with the
project's own error (InputError, naming the file); any other exception is a crash.

Two kinds of mutation, both driven by one integer seed so that a crash is reproducible:
* bytes: flip, overwrite, delete, duplicate or insert bytes, or truncate the file anywhere;
* elements: parse the file, then give header elements the readers use other values (wrong types,
  empty, huge, negative, NaN, wrong VR) or remove them, and write it back.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset

#: Elements whose values the readers interpret.
FUZZED_ELEMENTS = (
    "Modality", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
    "ImagerPixelSpacing", "PixelSpacing", "DistanceSourceToDetector", "DistanceSourceToPatient",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "SeriesInstanceUID", "PixelData",
    "KVP", "ImageType", "SeriesDescription",
)
ODD_VALUES = ("", "0", "-1", "1e308", "nan", "inf", "abc", "1\\2\\3\\4", "\\", "65536", "-32768", " 12 ",
              "MONOCHROME3", "RGB", "YBR_FULL", "CT", "MR", "DX", "1.2.3", "0.0\\0.0", "-0.5\\0.5", "\x00")


def mutate_bytes(data: bytes, rng: random.Random, n_edits: int = 4) -> bytes:
    buf = bytearray(data)
    for _ in range(n_edits):
        if not buf:
            break
        op = rng.randrange(6)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            del buf[i:i + rng.randint(1, 64)]
        elif op == 3:
            buf[i:i] = buf[i:i + rng.randint(1, 64)]
        elif op == 4:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del buf[i:]
    return bytes(buf)


def mutate_elements(data: bytes, rng: random.Random, n_edits: int = 3) -> bytes:
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(data), force=True)
    for _ in range(n_edits):
        keyword = rng.choice(FUZZED_ELEMENTS)
        op = rng.randrange(4)
        if op == 0 and keyword in ds:
            delattr(ds, keyword)
        elif keyword == "PixelData":
            pixels = ds.get("PixelData", b"")
            ds.PixelData = pixels[: rng.randrange(len(pixels) + 1)] if op == 1 else pixels + b"\x00" * 7
        else:
            # Raw values through a permissive VR: the reader sees exactly what a broken writer wrote.
            tag = pydicom.datadict.tag_for_keyword(keyword)
            value = rng.choice(ODD_VALUES) if op != 3 else str(rng.uniform(-1e6, 1e6))
            ds.add_new(tag, "LO" if keyword not in ("Rows", "Columns") else rng.choice(("US", "LO")),
                       value if keyword not in ("Rows", "Columns") or op == 3 else _as_us(value))
    out = BytesIO()
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    try:
        ds.save_as(out, enforce_file_format=False)
    except Exception:  # a value pydicom itself refuses to write: keep the byte-level mutant instead
        return mutate_bytes(data, rng)
    return out.getvalue()


def _as_us(value: str) -> int | str:
    try:
        return int(float(value)) % 65536
    except (ValueError, OverflowError):  # "nan", "inf", "abc"
        return 0


def mutant(data: bytes, seed: int) -> bytes:
    """The mutant of ``data`` for this seed (reproducible)."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return mutate_bytes(data, rng, n_edits=rng.randint(1, 8))
    return mutate_elements(data, rng, n_edits=rng.randint(1, 4))


def small_dx(path: Path, photometric: str = "MONOCHROME2", bits: int = 12) -> Path:
    """A valid 32x24 DX file (the radiograph seed of the fuzzer)."""
    from bonedrr.dicom import write_radiograph_dicom

    stored = (np.arange(32 * 24).reshape(24, 32) % (2 ** bits)).astype(np.uint16)
    write_radiograph_dicom(path, stored, (0.2, 0.2), 1100.0, 950.0, {"PatientName": "Fuzz^Seed"}, key="fuzz",
                           bits_stored=bits, photometric=photometric)
    return path


def small_ct(folder: Path, slices: int = 4) -> Path:
    """A valid 4-slice 16x16 CT series (the CT seed of the fuzzer)."""
    import SimpleITK as sitk

    from bonedrr.dicom import write_ct_series

    hu = np.full((slices, 16, 16), -1000.0, np.float32)
    hu[:, 4:12, 4:12] = 300.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    write_ct_series(folder, image, {"PatientName": "Fuzz^Seed"}, key="fuzz-ct")
    return folder
