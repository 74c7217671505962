"""Density calibration on virtual patients (truth known) and the DRR stage's files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.bmd import drr_vbmd
from bonedrr.calibrate import calibrate, calibrate_case, density_volume, phantom_calibration
from bonedrr.drr import (DEFAULT_CHANNELS, STRUCTURES, THICKNESS_CHANNELS, channel_matrix, read_drr, render_case,
                         structure_volume, write_drr)
from bonedrr.device import cuda_available
from bonedrr.errors import InputError
from bonedrr.geometry import Geometry
from bonedrr.images import world_axis_grid
from bonedrr.labels import CANONICAL_LABELS, proximal_femur_mask

from conftest import REAL_CT

SCANNERS = {"demo_scanner_a": {"slope": 1.1155, "intercept": -12.0},
            "demo_scanner_b": {"slope": 1.196, "intercept": 18.0},
            "demo_scanner_c": {"slope": 1.265, "intercept": 35.0}}
PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200, 400, 800]}


@pytest.fixture(scope="module")
def cases(demo_cases, tmp_path_factory):
    folder, settings, truths = demo_cases
    scratch = tmp_path_factory.mktemp("ingested")
    out = []
    for truth in truths:
        case = folder / truth["case_id"]
        ct = case / "ct.nii.gz"
        if not ct.exists():  # the DICOM case: read the series once into a NIfTI
            from bonedrr.ingest import read_ct
            ct = scratch / f"{truth['case_id']}_ct.nii.gz"
            sitk.WriteImage(read_ct(case / "ct")[0], str(ct))
        out.append((ct, case / "labels.nii.gz", truth))
    return out


@pytest.mark.parametrize("settings, tolerance", [
    (PHANTOM, 0.02),
    ({"method": "scanner", "scanners": SCANNERS}, 0.04),  # scans drift from the documented lines
    ({"method": "internal", "internal_fat_hu": -97, "internal_muscle_hu": 27}, 0.15),
])
def test_recovered_vbmd_matches_truth(tmp_path, cases, settings, tolerance):
    for ct, labels, truth in cases:
        record = calibrate_case(ct, labels, tmp_path / truth["case_id"], settings,
                                scanner=truth["clinical"]["scanner"], cut_mm=truth["proximal_femur_cut_mm"])
        for side in ("left", "right"):
            assert record["qct_vbmd_mg_cm3"][side] == pytest.approx(truth["qct_vbmd_mg_cm3"][side], rel=tolerance)
        assert sorted(p.name for p in (tmp_path / truth["case_id"]).iterdir()) == [
            "calibration.json", "calibration.png", "density.nii.gz"]


def test_phantom_fit_matches_the_scanner(cases):
    ct, labels, truth = cases[0]
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct), sitk.sitkFloat32))
    cal = calibrate(hu, sitk.GetArrayFromImage(sitk.ReadImage(str(labels))), PHANTOM)
    scanner = truth["scanner"]
    assert cal.slope == pytest.approx(scanner["hu_slope"] * scanner["ha_hu_per_mg_cm3_ideal"], rel=0.005)
    assert cal.intercept == pytest.approx(scanner["hu_intercept"], abs=2.0)
    assert cal.details["r2"] > 0.9999 and len(cal.details["rods"]) == 4  # the 0 rod is resin-like
    # Density: bone mineral where labelled bone, mass density (water ~1000) elsewhere.
    density = density_volume(hu, sitk.GetArrayFromImage(sitk.ReadImage(str(labels))), cal)
    assert density.min() >= 0 and 950 < np.median(density[(hu > 0) & (hu < 60)]) < 1080


def test_phantom_errors(cases):
    ct, labels, truth = cases[0]
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct), sitk.sitkFloat32))
    with pytest.raises(InputError, match=r"found 4 rods differing from the resin, expected 3"):
        phantom_calibration(hu, [0, 100, 200, 400], 0.0, 1.15)
    with pytest.raises(InputError, match=r"phantom fit is poor"):
        phantom_calibration(hu, [0, 100, 200, 300, 350], 0.0, 1.15)
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_CT), sitk.sitkFloat32))
    with pytest.raises(InputError, match="no calibration phantom found"):
        phantom_calibration(real, [0, 100, 200], 0.0, 1.15)


def test_scanner_method_needs_the_scanner(tmp_path, cases):
    ct, labels, truth = cases[0]
    with pytest.raises(InputError, match="needs the sample sheet's scanner column"):
        calibrate_case(ct, labels, tmp_path, {"method": "scanner", "scanners": SCANNERS})
    with pytest.raises(InputError, match="scanner 'ct9' has no coefficients"):
        calibrate_case(ct, labels, tmp_path, {"method": "scanner", "scanners": SCANNERS}, scanner="ct9")


def test_structures_and_channels():
    assert all(STRUCTURES[i] == name for name, i in CANONICAL_LABELS.items())
    m = channel_matrix(DEFAULT_CHANNELS)
    partition = m[[list(DEFAULT_CHANNELS).index(c) for c in ("bone", "muscle", "soft_tissue")]]
    np.testing.assert_array_equal(partition.sum(0), np.ones(len(STRUCTURES)))
    with pytest.raises(ValueError, match="unknown structure 'spleen'"):
        channel_matrix({"organs": ["spleen"]})
    labels = np.zeros((30, 2, 2), np.uint8)
    labels[:, 0, 0] = CANONICAL_LABELS["femur_left"]
    z = np.arange(30, dtype=float)[:, None, None] * 5.0  # 5 mm slices, top at 145 mm
    s = structure_volume(labels, np.broadcast_to(z, labels.shape), cut_mm=80.0)
    assert (s[:, 0, 0] == STRUCTURES.index("proximal_femur_left")).sum() == 17  # 65..145 mm
    assert (s[:, 0, 0] == CANONICAL_LABELS["femur_left"]).sum() == 13


def test_drr_stage_on_a_virtual_patient(tmp_path, cases):
    ct, labels, truth = cases[1]
    calibrate_case(ct, labels, tmp_path, PHANTOM)
    geometry = Geometry.from_dict(truth["geometry"])
    result = render_case(tmp_path / "density.nii.gz", labels, geometry, device="cpu")
    drr = dict(zip(result["channels"], result["drr"]))
    total = drr["bone"] + drr["muscle"] + drr["soft_tissue"]
    assert total.shape == (geometry.rows, geometry.cols)
    # Femur = its proximal part + the rest; bone includes both femurs.
    np.testing.assert_allclose(drr["femur_left"] >= drr["proximal_femur_left"], True)
    assert drr["proximal_femur_left"].max() > 0.5 and drr["proximal_femur_right"].max() > 0.5
    # The proximal femurs lie on the correct sides of the image (patient's left = larger columns).
    cols = np.arange(geometry.cols)
    left = np.average(cols, weights=drr["proximal_femur_left"].sum(0))
    right = np.average(cols, weights=drr["proximal_femur_right"].sum(0))
    assert left > geometry.cols / 2 > right
    write_drr(tmp_path / "drr.h5", result)
    back = read_drr(tmp_path / "drr.h5")
    np.testing.assert_array_equal(back["drr"], result["drr"])
    assert back["channels"] == [*DEFAULT_CHANNELS, *THICKNESS_CHANNELS] and back["units"] == "g/cm2"
    assert back["channel_units"]["proximal_femur_thickness_left"] == "cm" and back["channel_units"]["bone"] == "g/cm2"
    assert Geometry.from_dict(back["geometry"]).to_dict() == geometry.to_dict()
    # The thickness channels hold each ray's chord through the proximal femur (cm): with the density
    # channel they give the region's mean density, which the CT has in 3D (the rendered density: bone
    # voxels clipped at 0), read from two projections.
    density_image = sitk.ReadImage(str(tmp_path / "density.nii.gz"))
    density = sitk.GetArrayFromImage(density_image)
    label_volume = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    for side in ("left", "right"):
        region = proximal_femur_mask(label_volume, side, world_axis_grid(density_image, 2), 80.0)
        thickness = drr[f"proximal_femur_thickness_{side}"]
        assert 3.0 < thickness.max() < 8.0  # cm: a femoral head is 4-5 cm across
        vbmd = drr_vbmd(drr[f"proximal_femur_{side}"], thickness)
        np.testing.assert_allclose(vbmd, density[region].mean(), rtol=0.02)


def test_drr_cli_writes_h5_and_contact_sheet(tmp_path, cases):
    ct, labels, truth = cases[1]
    calibrate_case(ct, labels, tmp_path, PHANTOM)
    geometry = tmp_path / "truth.json"
    geometry.write_text(json.dumps(truth))
    channels = json.dumps({"bone": ["femur_left", "femur_right", "hip_left", "hip_right", "other_bone",
                                    "proximal_femur_left", "proximal_femur_right"], "rest": ["unlabelled"]})
    result = subprocess.run([sys.executable, "-m", "bonedrr", "drr", "--density", str(tmp_path / "density.nii.gz"),
                             "--labels", str(labels), "--geometry", str(geometry), "--out", str(tmp_path / "d.h5"),
                             "--png", str(tmp_path / "d.png"), "--method", "trilinear", "--device", "cpu",
                             "--channels", channels], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    back = read_drr(tmp_path / "d.h5")
    assert back["channels"] == ["bone", "rest", *THICKNESS_CHANNELS] and back["method"] == "trilinear"
    assert (tmp_path / "d.png").stat().st_size > 10_000
    # the same on a GPU: the same channels where CuPy finds one, else one clear error
    on_cuda = subprocess.run([sys.executable, "-m", "bonedrr", "drr", "--density", str(tmp_path / "density.nii.gz"),
                              "--labels", str(labels), "--geometry", str(geometry), "--out", str(tmp_path / "e.h5"),
                              "--method", "trilinear", "--device", "cuda", "--channels", channels],
                             capture_output=True, text=True)
    if cuda_available():
        assert on_cuda.returncode == 0, on_cuda.stderr
        np.testing.assert_allclose(read_drr(tmp_path / "e.h5")["drr"], back["drr"], rtol=1e-4, atol=1e-4)
    else:
        assert on_cuda.returncode == 2 and not (tmp_path / "e.h5").exists()
        assert on_cuda.stderr.strip().splitlines()[-1].startswith(
            "bonedrr drr: error: --device cuda was asked for, but CuPy finds no CUDA device")


def test_cli_errors_for_bad_geometry_and_boneless_labels(tmp_path, cases):
    ct, labels, truth = cases[1]
    calibrate_case(ct, labels, tmp_path, PHANTOM)
    bad = tmp_path / "geometry.json"
    bad.write_text(json.dumps({"sdd_mm": 1000, "rows": 4}))
    result = subprocess.run([sys.executable, "-m", "bonedrr", "drr", "--density", str(tmp_path / "density.nii.gz"),
                             "--labels", str(labels), "--geometry", str(bad), "--out", str(tmp_path / "d.h5")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"bonedrr drr: error: {bad}: not a projection geometry: missing cols, pixel_mm, principal_point_px, "
        "world_to_camera")
    empty = tmp_path / "empty_labels.nii.gz"
    blank = sitk.Image(sitk.ReadImage(str(labels)).GetSize(), sitk.sitkUInt8)  # all background
    blank.CopyInformation(sitk.ReadImage(str(labels)))
    sitk.WriteImage(blank, str(empty))
    case_json = tmp_path / "case.json"
    case_json.write_text(json.dumps({"geometry_prior": {"sdd_mm": 1100, "rows": 96, "cols": 160, "pixel_mm": [2.8, 2.8],
                                                        "principal_point_px": [47.5, 79.5]}}))
    sitk.WriteImage(sitk.Image(160, 96, sitk.sitkFloat32), str(tmp_path / "xray.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "bonedrr", "register", "--density", str(tmp_path / "density.nii.gz"),
                             "--labels", str(empty), "--xray", str(tmp_path / "xray.nii.gz"), "--case", str(case_json),
                             "--out", str(tmp_path / "pose.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"bonedrr register: error: {empty}: no bone in the labels: nothing to register"
    assert not (tmp_path / "pose.json").exists()


def test_drr_renders_a_femur_at_its_own_pose(tmp_path, cases):
    """After a per-structure registration: the left femur (with its proximal part) at its own pose, the rest
    at the main pose; pose.json's femur poses reach the renderer through structure_poses."""
    from bonedrr.drr import structure_poses
    from bonedrr.geometry import translation

    ct, labels, truth = cases[1]
    calibrate_case(ct, labels, tmp_path, PHANTOM)
    geometry = Geometry.from_dict(truth["geometry"])
    moved = translation([12.0, 0, 0]) @ geometry.world_to_camera
    record = {"geometry": geometry.to_dict(), "structures": {
        "pelvis": {"world_to_camera": geometry.world_to_camera.tolist()},
        "femur_left": {"world_to_camera": moved.tolist()}}}
    poses = structure_poses(record)
    assert list(poses) == ["femur_left"]
    split = render_case(tmp_path / "density.nii.gz", labels, geometry, device="cpu", femur_poses=poses)
    still = render_case(tmp_path / "density.nii.gz", labels, geometry, device="cpu")
    shifted = render_case(tmp_path / "density.nii.gz", labels, geometry.with_pose(moved), device="cpu")
    c = {name: i for i, name in enumerate(split["channels"])}
    for name in ("femur_left", "proximal_femur_left"):
        np.testing.assert_allclose(split["drr"][c[name]], shifted["drr"][c[name]], atol=1e-5)
    for name in ("pelvis", "femur_right", "muscle", "soft_tissue"):
        np.testing.assert_allclose(split["drr"][c[name]], still["drr"][c[name]], atol=1e-5)
    assert not np.allclose(split["drr"][c["femur_left"]], still["drr"][c["femur_left"]], atol=1e-3)
    write_drr(tmp_path / "drr.h5", split)
    assert read_drr(tmp_path / "drr.h5")["femur_poses"]["femur_left"] == moved.round(10).tolist()
