"""DICOM reading on the real CT written as a series, and each bad input with its exact message."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from bonedrr.dicom import read_ct_series, read_radiograph, technical_metadata, write_radiograph_dicom
from bonedrr.errors import InputError

from conftest import PHI, hu_array


def slices(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def test_real_ct_round_trips_through_dicom(real_ct, real_ct_dicom):
    image, meta = read_ct_series(real_ct_dicom)
    reference = sitk.DICOMOrient(real_ct, "LPS")  # the series is written axial, identity direction
    np.testing.assert_array_equal(hu_array(image), hu_array(reference))
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 3.0))
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    # Physical position of one voxel is the same as in the NIfTI (direction honoured on both sides).
    p = real_ct.TransformIndexToPhysicalPoint((10, 20, 30))
    np.testing.assert_allclose(image.GetPixel(image.TransformPhysicalPointToIndex(p)), real_ct.GetPixel(10, 20, 30))
    assert meta["Modality"] == "CT" and "PatientName" not in meta


def test_slices_are_sorted_by_position_not_file_name(dicom_copy, real_ct_dicom):
    files = slices(dicom_copy)
    for f in files:  # reverse the file names
        f.rename(f.with_name(f"x{len(files) - int(f.stem[2:]):04d}.dcm"))
    a, _ = read_ct_series(dicom_copy)
    b, _ = read_ct_series(real_ct_dicom)
    np.testing.assert_array_equal(hu_array(a), hu_array(b))


def test_truncated_file(dicom_copy):
    f = slices(dicom_copy)[40]
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value).startswith(f"{f}: ")
    assert "truncated" in str(e.value)


def test_file_without_pixel_data(dicom_copy):
    f = slices(dicom_copy)[10]
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(f)
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == f"{f}: DICOM file has no pixel data"


def test_not_dicom(dicom_copy):
    (dicom_copy / "notes.txt").write_text("scanned on Tuesday")
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == f"{dicom_copy / 'notes.txt'}: not a DICOM file (no DICM preamble)"


def test_missing_slice(dicom_copy):
    files = slices(dicom_copy)
    files[50].unlink()
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == (f"{dicom_copy}: 1 missing slice(s) between {files[49].name} and {files[51].name} "
                            "(gap 6.00 mm, spacing 3.00 mm)")


def test_uneven_spacing(dicom_copy):
    f = slices(dicom_copy)[60]
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + 1.0]
    ds.save_as(f)
    with pytest.raises(InputError, match=r"uneven slice spacing: 4.00 mm between CT0060.dcm and CT0061.dcm, "
                                         r"3.00 mm elsewhere"):
        read_ct_series(dicom_copy)


def test_two_series_in_one_folder(dicom_copy):
    ds = pydicom.dcmread(slices(dicom_copy)[0])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesNumber = 7
    ds.save_as(dicom_copy / "scout.dcm")
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == (f"{dicom_copy}: folder holds 2 series (series number 2 (112 files), series number 7 "
                            "(1 files)); give each series its own folder")


def test_mr_given_as_ct(dicom_copy):
    for f in slices(dicom_copy):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == f"{slices(dicom_copy)[0]}: modality is MR, not CT"


def test_single_slice_is_not_a_volume(dicom_copy):
    for f in slices(dicom_copy)[1:]:
        f.unlink()
    with pytest.raises(InputError) as e:
        read_ct_series(dicom_copy)
    assert str(e.value) == f"{dicom_copy}: a single 2D image (1 file), not a CT volume"


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="folder holds no DICOM files"):
        read_ct_series(tmp_path)


# ---------------------------------------------------------------------------------------------
# Radiographs

RAMP = np.tile(np.arange(64, dtype=np.float64), (48, 1)) / 63  # 48 x 64, 0..1 left to right


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_radiograph_bit_depths_and_monochrome1(tmp_path, bits, photometric):
    top = 2 ** bits - 1
    stored = np.round(RAMP * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = top - stored  # stored dark-for-bone; read back bone-bright
    path = tmp_path / "dx.dcm"
    write_radiograph_dicom(path, stored, (0.15, 0.16), 1150, 980, PHI, key="t", bits_stored=bits,
                           photometric=photometric)
    r = read_radiograph(path)
    np.testing.assert_allclose(r.pixels, np.round(RAMP * top))
    assert r.pixel_mm == (0.15, 0.16) and r.spacing_source == "ImagerPixelSpacing"
    assert r.sdd_mm == 1150 and r.sod_mm == 980
    assert r.metadata["PhotometricInterpretation"] == photometric and r.metadata["BitsStored"] == bits
    assert not set(r.metadata) & set(PHI)


def test_radiograph_spacing_fallbacks(tmp_path):
    path = tmp_path / "dx.dcm"
    write_radiograph_dicom(path, np.zeros((8, 8), np.uint16), (0.2, 0.2), 1000, 900, PHI, key="t")
    ds = pydicom.dcmread(path)
    del ds.ImagerPixelSpacing
    ds.PixelSpacing = [0.17, 0.17]
    ds.save_as(path)
    assert read_radiograph(path).spacing_source == "PixelSpacing"
    del ds.PixelSpacing
    ds.save_as(path)
    assert read_radiograph(path, default_pixel_mm=[0.3, 0.3]).pixel_mm == (0.3, 0.3)
    with pytest.raises(InputError) as e:
        read_radiograph(path)
    assert str(e.value) == (f"{path}: radiograph has no ImagerPixelSpacing or PixelSpacing and the cohort "
                            "config sets no xray.pixel_mm default")


def test_ct_slice_given_as_radiograph(real_ct_dicom):
    f = slices(real_ct_dicom)[0]
    with pytest.raises(InputError) as e:
        read_radiograph(f)
    assert str(e.value) == f"{f}: modality is CT, not a radiograph (DX/CR/RG)"


def test_png_and_jpeg_radiographs(tmp_path):
    png16 = tmp_path / "a.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(png16)
    r = read_radiograph(png16, default_pixel_mm=(0.2, 0.2))
    assert r.pixels.max() == 65535 and r.metadata["bits"] in (16, 32)
    jpg = tmp_path / "a.jpg"
    Image.fromarray(np.round(RAMP * 255).astype(np.uint8)).save(jpg, quality=90)
    assert abs(read_radiograph(jpg, default_pixel_mm=(0.2, 0.2)).pixels.mean() - 127.5) < 2
    with pytest.raises(InputError) as e:
        read_radiograph(png16)
    assert str(e.value) == f"{png16}: PNG/JPEG has no pixel spacing and the cohort config sets no xray.pixel_mm default"
    colour = tmp_path / "c.png"
    Image.fromarray(np.stack([np.zeros((8, 8)), np.ones((8, 8)), np.zeros((8, 8))], -1).astype(np.uint8)).save(colour)
    with pytest.raises(InputError, match="colour image: a radiograph must be greyscale"):
        read_radiograph(colour, default_pixel_mm=(0.2, 0.2))


def test_technical_metadata_is_a_whitelist(real_ct_dicom):
    ds = pydicom.dcmread(slices(real_ct_dicom)[0])
    assert str(ds.PatientName) == PHI["PatientName"]
    meta = technical_metadata(ds)
    text = repr(meta)
    for value in PHI.values():
        assert value not in text
    assert "UID" not in text and meta["KVP"] == 120.0
