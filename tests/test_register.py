"""2D/3D registration on a virtual patient (truth known), from the automatic initial pose."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.calibrate import calibrate_case
from bonedrr.geometry import Geometry, pose_from_params
from bonedrr.images import index_to_world
from bonedrr.register import (Registration, gradient_correlation, perturb, register_case,
                              reprojection_distance_mm, rotation_error_deg)

pytestmark = pytest.mark.slow
PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200, 400, 800]}


@pytest.fixture(scope="module")
def case(demo_cases, tmp_path_factory):
    from bonedrr.ingest import ingest_case

    folder, settings, truths = demo_cases
    out = tmp_path_factory.mktemp("registration")
    truth = truths[1]  # NIfTI + PNG: the initial pose has no DICOM distance, only the config's SDD
    record = ingest_case("demo_001", folder / "demo_001" / "ct.nii.gz", folder / "demo_001" / "xray.png", out,
                         pixel_mm=settings.pixel_mm, sdd_mm=settings.sdd_mm)
    calibrate_case(out / "ct.nii.gz", folder / "demo_001" / "labels.nii.gz", out, PHANTOM)
    return out, folder / "demo_001" / "labels.nii.gz", record, truth


def pelvis_and_femur_points(labels_path):
    image = sitk.ReadImage(str(labels_path))
    labels = sitk.GetArrayFromImage(image)
    a = index_to_world(image)
    k, j, i = np.nonzero(np.isin(labels, [1, 2, 3, 4]))
    return np.stack([i, j, k], -1)[::10] @ a[:3, :3].T + a[:3, 3]


def test_gradient_correlation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 50)).cumsum(0).cumsum(1)
    assert gradient_correlation(a, a) == pytest.approx(1.0)
    assert gradient_correlation(a, 3 * a + 7) == pytest.approx(1.0)  # exposure and window do not matter
    assert gradient_correlation(a, -a) == pytest.approx(-1.0)
    assert abs(gradient_correlation(a, rng.normal(size=a.shape))) < 0.2


def test_registers_a_virtual_patient_from_the_automatic_start(tmp_path, case):
    out, labels, record, truth = case
    pose = register_case(out / "density.nii.gz", labels, out / "xray.nii.gz", record, tmp_path / "pose.json",
                         tmp_path / "overlay.png", device="cpu")
    truth_geometry = Geometry.from_dict(truth["geometry"])
    found = np.asarray(pose["world_to_camera"])
    points = pelvis_and_femur_points(labels)
    assert pose["converged"] and pose["qa_flags"] == []
    # 2.8 mm pixels in this small test (the demo's are 1.4 mm): sub-pixel, under a degree.
    assert reprojection_distance_mm(found, truth_geometry.world_to_camera, truth_geometry, points) < 1.0
    assert rotation_error_deg(found, truth_geometry.world_to_camera) < 1.0
    saved = json.loads((tmp_path / "pose.json").read_text())
    assert Geometry.from_dict(saved["geometry"]).rows == truth_geometry.rows
    assert (tmp_path / "overlay.png").stat().st_size > 10_000


def test_a_wrong_radiograph_is_flagged_not_silently_registered(case):
    out, labels, record, truth = case
    density = sitk.ReadImage(str(out / "density.nii.gz"), sitk.sitkFloat32)
    noise = np.random.default_rng(1).normal(size=(record["xray"]["rows"], record["xray"]["cols"]))
    prior = record["geometry_prior"]
    g = Geometry(prior["sdd_mm"], prior["rows"], prior["cols"], prior["pixel_mm"], prior["principal_point_px"])
    reg = Registration(sitk.GetArrayFromImage(density), sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
                       index_to_world(density), noise, g, 900.0, device="cpu")
    result = reg.run()
    assert not result["converged"] and "low_similarity" in result["qa_flags"]


def test_perturb_rotates_about_the_centre():
    pose = pose_from_params([0, 0, 0, 0, 0, 800])
    centre = np.array([10.0, 20.0, 30.0])
    moved = perturb(pose, np.array([0, 0, 30.0, 0, 0, 0]), centre)
    np.testing.assert_allclose(moved[:3, :3] @ centre + moved[:3, 3], pose[:3, :3] @ centre + pose[:3, 3])
