"""Ingest on the real CT and on generated DICOM; bad inputs; no identifying value in the outputs."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bonedrr.dicom import write_radiograph_dicom
from bonedrr.errors import InputError
from bonedrr.ingest import ingest_case, read_ct

from conftest import PHI, REAL_CT, REAL_LABELS, hu_array


@pytest.fixture
def dx(tmp_path) -> Path:
    path = tmp_path / "pelvis.dcm"
    stored = (np.indices((40, 50)).sum(0) * 20).astype(np.uint16)
    write_radiograph_dicom(path, stored, (0.3, 0.3), 1120, 930, PHI, key="t", bits_stored=12)
    return path


def write_volume(tmp_path, array, reference, name="ct.nii.gz") -> Path:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    sitk.WriteImage(img, str(tmp_path / name))
    return tmp_path / name


def test_ingest_real_ct_nifti(tmp_path, real_ct, dx):
    record = ingest_case("real_1", REAL_CT, dx, tmp_path / "out", side="right", labels=None,
                         clinical={"dxa_abmd_right": 0.8}, cohort="c")
    ct = sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz"))
    np.testing.assert_array_equal(hu_array(ct), hu_array(real_ct))
    np.testing.assert_allclose(ct.GetDirection(), real_ct.GetDirection())
    np.testing.assert_allclose(ct.GetOrigin(), real_ct.GetOrigin(), atol=1e-4)
    xray = sitk.ReadImage(str(tmp_path / "out" / "xray.nii.gz"))
    assert xray.GetSize() == (50, 40) and xray.GetSpacing() == pytest.approx((0.3, 0.3))
    saved = json.loads((tmp_path / "out" / "case.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["geometry_prior"] == {"sdd_mm": 1120.0, "rows": 40, "cols": 50, "pixel_mm": [0.3, 0.3],
                                       "principal_point_px": [19.5, 24.5], "source_to_patient_mm": 930.0}
    assert saved["ct"]["hu_range"] == [-1207.0, 3382.0] and saved["ct"]["format"] == "nii.gz"
    assert saved["side"] == "right" and saved["clinical"] == {"dxa_abmd_right": 0.8}
    assert saved["patient_id"] == "real_1"  # default: the case id
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.json", "ct.nii.gz", "xray.nii.gz"]


def test_patient_id_groups_cases(tmp_path, dx):
    record = ingest_case("real_1_visit2", REAL_CT, dx, tmp_path / "out", sdd_mm=1000,
                         clinical={"patient_id": "P17", "scanner": "a"})
    assert record["patient_id"] == "P17" and record["clinical"] == {"scanner": "a"}


def test_ingest_checks_labels_against_the_ct_grid(tmp_path, real_ct, dx):
    from bonedrr.labels import PRESETS, remap
    seg = sitk.ReadImage(str(REAL_LABELS))
    canonical = remap(sitk.GetArrayFromImage(seg), PRESETS["totalsegmentator_v2"])
    good = write_volume(tmp_path, canonical, seg, "labels.nii.gz")
    assert ingest_case("a", REAL_CT, dx, tmp_path / "a", labels=good)["reference_labels"] is True
    cropped = write_volume(tmp_path, canonical[:, :, :100].copy(), sitk.RegionOfInterest(seg, (100, 101, 112)),
                           "cropped.nii.gz")
    with pytest.raises(InputError) as e:
        ingest_case("a", REAL_CT, dx, tmp_path / "b", labels=cropped)
    assert str(e.value) == (f"{cropped}: label grid (size (100, 101, 112), spacing 3x3x3) differs from the CT's "
                            "(size (122, 101, 112), spacing 3x3x3)")
    raw_ts = tmp_path / "ts.nii.gz"
    sitk.WriteImage(seg, str(raw_ts))
    with pytest.raises(InputError, match=r"label ids \[14, 18, .*\] are not canonical \(1\.\.13\); map them first"):
        ingest_case("a", REAL_CT, dx, tmp_path / "c", labels=raw_ts)


@pytest.mark.parametrize("change, message", [
    (lambda a: np.where(a > 3000, np.nan, a), "CT has 273 NaN or infinite voxels"),
    (lambda a: a * 100.0, "absurd HU range -120700..338200: not Hounsfield units"),
    (lambda a: a + 1207.0, "no value below -200 (range 0..4589): not a CT in Hounsfield units "
                           "(unsigned data without its rescale intercept, or another modality?)"),
])
def test_ct_values_that_are_not_hu(tmp_path, real_ct, change, message):
    path = write_volume(tmp_path, change(hu_array(real_ct)).astype(np.float32), real_ct)
    with pytest.raises(InputError) as e:
        read_ct(path)
    assert str(e.value) == f"{path}: {message}"


def test_2d_image_and_radiograph_given_as_ct(tmp_path, dx):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkInt16), str(flat))
    with pytest.raises(InputError) as e:
        read_ct(flat)
    assert str(e.value) == f"{flat}: a 2D image of size (64, 64), not a CT volume"
    with pytest.raises(InputError) as e:
        read_ct(dx)
    assert str(e.value) == f"{dx}: modality is DX, not CT"


def test_radiograph_without_distance_needs_a_default(tmp_path, dx):
    ds = pydicom.dcmread(dx)
    del ds.DistanceSourceToDetector
    ds.save_as(dx)
    with pytest.raises(InputError) as e:
        ingest_case("a", REAL_CT, dx, tmp_path / "a")
    assert str(e.value) == f"{dx}: radiograph has no DistanceSourceToDetector and the cohort config sets no xray.sdd_mm default"
    assert not (tmp_path / "a").exists()  # nothing half-written
    assert ingest_case("a", REAL_CT, dx, tmp_path / "a", sdd_mm=1000)["geometry_prior"]["sdd_mm"] == 1000


def _all_bytes(folder: Path) -> bytes:
    out = b""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out += gzip.decompress(data) if p.suffix == ".gz" else data
    return out


def test_demo_dicom_case_is_ingested_without_patient_identity(tmp_path, demo_cases):
    folder, settings, truths = demo_cases
    case = folder / "demo_000"
    phi = pydicom.dcmread(case / "xray.dcm")
    identity = [str(phi.PatientName), str(phi.PatientID), str(phi.PatientBirthDate), str(phi.InstitutionName),
                str(phi.AccessionNumber), str(phi.StudyInstanceUID), str(phi.SOPInstanceUID)]
    assert identity[0] and identity[1]  # the demo writes identities, so this test has something to find
    record = ingest_case("demo_000", case / "ct", case / "xray.dcm", tmp_path / "out",
                         labels=case / "labels.nii.gz", clinical=truths[0]["clinical"])
    written = _all_bytes(tmp_path / "out")
    for value in identity:
        assert value.encode() not in written, value
    assert record["xray"]["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert record["geometry_prior"]["sdd_mm"] == truths[0]["geometry"]["sdd_mm"]
    # the tube voltage from the header; a sheet value that disagrees does not override it
    assert (record["xray"]["KVP"], record["xray"]["kvp_source"]) == (truths[0]["exposure"]["kvp"], "dicom")
    again = ingest_case("demo_000", case / "ct", case / "xray.dcm", tmp_path / "again",
                        clinical={**truths[0]["clinical"], "xray_kvp": 150.0})
    assert again["xray"]["KVP"] == truths[0]["exposure"]["kvp"] and "xray_kvp" not in again["clinical"]
    ct = sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz"))
    assert ct.GetSize()[2] == len(list((case / "ct").glob("*.dcm")))


def test_demo_png_case_takes_spacing_from_config(tmp_path, demo_cases):
    folder, settings, truths = demo_cases
    case = folder / "demo_001"
    assert truths[1]["files"] == {"ct": "ct.nii.gz", "xray": "xray.png", "labels": "labels.nii.gz"}
    record = ingest_case("demo_001", case / "ct.nii.gz", case / "xray.png", tmp_path / "out",
                         pixel_mm=settings.pixel_mm, sdd_mm=settings.sdd_mm)
    assert record["xray"]["pixel_spacing_source"] == "config"
    assert (record["xray"]["rows"], record["xray"]["cols"]) == (settings.rows, settings.cols)
    assert "KVP" not in record["xray"]  # a PNG records no tube voltage; the sample sheet's xray_kvp gives it
    assert truths[1]["clinical"]["xray_kvp"] == truths[1]["exposure"]["kvp"]
    record = ingest_case("demo_001", case / "ct.nii.gz", case / "xray.png", tmp_path / "sheet",
                         pixel_mm=settings.pixel_mm, sdd_mm=settings.sdd_mm, clinical=truths[1]["clinical"])
    assert (record["xray"]["KVP"], record["xray"]["kvp_source"]) == (truths[1]["exposure"]["kvp"], "sample sheet")


def test_cli_error_is_one_line_without_traceback(tmp_path, dx):
    result = subprocess.run([sys.executable, "-m", "bonedrr", "ingest", "--case-id", "a", "--ct", str(dx),
                             "--xray", str(dx), "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"bonedrr ingest: error: {dx}: modality is DX, not CT"]


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_mha_and_nrrd_cts(tmp_path, real_ct, suffix):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(real_ct, str(path))
    image, meta = read_ct(path)
    assert meta == {"format": suffix[1:]}
    np.testing.assert_array_equal(hu_array(image), hu_array(real_ct))
    np.testing.assert_allclose(image.GetDirection(), real_ct.GetDirection())


def test_nan_in_mha_is_caught(tmp_path, real_ct):
    a = hu_array(real_ct)
    a[5, 5, 5] = np.nan
    path = write_volume(tmp_path, a, real_ct, "ct.mha")
    with pytest.raises(InputError, match="CT has 1 NaN or infinite voxels"):
        read_ct(path)
