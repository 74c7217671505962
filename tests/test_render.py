"""The renderer against closed-form line integrals, mass conservation, partitions, direction cosines,
and an independent projector on the real CT."""

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.demo.projector import project
from bonedrr.geometry import Geometry, ap_pose, apply, pose_from_params
from bonedrr.images import index_to_world
from bonedrr.labels import PRESETS, remap
from bonedrr.render import Renderer

from conftest import REAL_CT, REAL_LABELS

METHODS = ["siddon", "trilinear"]


def ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def grid_affine(shape_kji, spacing, centre_world=(0.0, 0.0, 0.0)):
    """Identity-direction affine placing the volume's centre at ``centre_world``."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = np.asarray(centre_world) - np.asarray(spacing) * (np.asarray(shape_kji[::-1]) - 1) / 2
    return a


def world_points(shape_kji, affine):
    k, j, i = np.indices(shape_kji, dtype=float)
    return np.stack([i, j, k], -1) @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("method", METHODS)
def test_box_chords_in_closed_form(method):
    # A box aligned with voxel faces: 60 x 40 x 28 mm of 1000 mg/cm3 in 2 mm voxels (faces at even mm).
    shape, spacing = (40, 40, 50), (2.0, 2.0, 2.0)
    affine = grid_affine(shape, spacing)
    p = world_points(shape, affine)
    half = np.array([30.0, 20.0, 14.0])
    box = np.all(np.abs(p) < half, axis=-1)
    density = np.where(box, 1000.0, 0.0).astype(np.float32)
    g = Geometry.centered(1000.0, 21, 21, (4.0, 4.0), ap_pose([0, 0, 0], 700.0))
    drr = Renderer(density, np.zeros(shape, np.uint8), affine, method=method, device="cpu",
                   step_mm=0.1).render(g)[0]
    # Exact chord of each ray through the box (slab method in world coordinates).
    source = g.source_world()
    ends = apply(np.linalg.inv(g.world_to_camera), g.pixel_centers_camera())
    d = ends - source
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        t1, t2 = (-half - source) / d, (half - source) / d
    chord = np.clip(np.minimum(t1, t2).max(-1) * -1 + np.maximum(t1, t2).min(-1), 0, None)
    expected = chord / 10.0  # 1 g/cm3 x cm
    inside = expected > 2.0  # rays through the front and back faces, not grazing an edge
    rel = np.abs(drr[inside] - expected[inside]) / expected[inside]
    assert rel.max() < (1e-5 if method == "siddon" else 5e-3)
    assert drr[expected == 0].max() < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_sphere_chords_in_closed_form(method):
    # A sphere of radius 40 mm, 1500 mg/cm3, in 0.5 mm voxels with partial-volume occupancy.
    shape, h, radius = (170, 170, 170), 0.5, 40.0
    affine = grid_affine(shape, (h, h, h), centre_world=(5.0, -3.0, 2.0))
    r = np.linalg.norm(world_points(shape, affine) - [5.0, -3.0, 2.0], axis=-1)
    density = (1500.0 * np.clip((radius - r) / h + 0.5, 0, 1)).astype(np.float32)
    g = Geometry.centered(1000.0, 31, 31, (3.0, 3.0), ap_pose([5.0, -3.0, 2.0], 600.0, rotvec_deg=(10, 20, 5)))
    drr = Renderer(density, np.zeros(shape, np.uint8), affine, method=method, device="cpu").render(g)[0]
    source = g.source_world()
    ends = apply(np.linalg.inv(g.world_to_camera), g.pixel_centers_camera())
    d = ends - source
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    to_centre = np.array([5.0, -3.0, 2.0]) - source
    distance = np.linalg.norm(np.cross(d, to_centre), axis=-1)
    chord = 2 * np.sqrt(np.clip(radius ** 2 - distance ** 2, 0, None))
    expected = 1.5 * chord / 10.0
    inside = distance < 0.6 * radius  # chords of 64 mm and more: voxelisation is a small share
    rel = np.abs(drr[inside] - expected[inside]) / expected[inside]
    assert rel.mean() < 0.002 and rel.max() < 0.005


@pytest.fixture(scope="module")
def real():
    ct = sitk.ReadImage(str(REAL_CT), sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(ct)
    labels = remap(sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_LABELS))), PRESETS["totalsegmentator_v2"])
    density = np.clip(1000.0 + hu, 0, None).astype(np.float32)  # mass density, mg/cm3
    affine = index_to_world(ct)
    centre = affine[:3, :3] @ ((np.array(ct.GetSize()) - 1) / 2) + affine[:3, 3]
    return ct, density, labels, affine, centre


@pytest.mark.parametrize("method", METHODS)
def test_mass_conservation_on_the_real_ct(real, method):
    ct, density, labels, affine, centre = real
    bone = np.isin(labels, [1, 2, 3, 4, 13])
    bone_density = np.where(bone, density, 0).astype(np.float32)
    mass_g = bone_density.sum() * np.prod(ct.GetSpacing()) / 1e6  # mg/cm3 x mm3 -> g
    sod, sdd = 3000.0, 3600.0  # far enough that the bones' depth spread is a small share of it
    g = Geometry.centered(sdd, 250, 250, (2.4, 2.4), ap_pose(centre, sod, rotvec_deg=(3, 0, 20)))
    drr = Renderer(bone_density, bone.astype(np.uint8), affine, method=method, device="cpu").render(g)
    # A pixel sees area pixel_area x cos(theta) / M^2 at depth d (M = SDD / d); d: the bone's mean
    # depth, which its spread around the mean (tens of mm at 3 m) hardly changes.
    k, j, i = np.nonzero(bone)
    depth = apply(g.world_to_camera @ affine, np.stack([i, j, k], -1).astype(float))[:, 2]
    mean_depth = np.average(depth, weights=bone_density[bone])
    c = g.pixel_centers_camera()
    cos = c[..., 2] / np.linalg.norm(c, axis=-1)
    estimate = (drr[1] * cos).sum() * (2.4 * 2.4 / 100) / (sdd / mean_depth) ** 2
    assert drr[0].max() == 0.0  # nothing but bone in the volume
    assert estimate == pytest.approx(mass_g, rel=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_channels_partition_the_total_and_backends_agree(real, method):
    ct, density, labels, affine, centre = real
    g = Geometry.centered(1000.0, 80, 80, (6.0, 6.0), ap_pose(centre, 700.0, rotvec_deg=(4, -6, 2)))
    split = Renderer(density, labels, affine, n_channels=14, method=method, device="cpu").render(g)
    total = Renderer(density, np.zeros_like(labels), affine, n_channels=1, method=method, device="cpu").render(g)
    np.testing.assert_allclose(split.sum(0), total[0], rtol=1e-5, atol=1e-5)
    assert (split[1] > 0).sum() > 20 and split[1].sum() < 0.05 * total.sum()  # femur_left, a small part
    array_path = Renderer(density, labels, affine, n_channels=14, method=method, device="cpu",
                          backend="array").render(g)
    np.testing.assert_allclose(array_path, split, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_direction_cosines_are_honoured(real, method):
    """The same physical volume stored on a flipped, and on an obliquely rotated grid: same DRR."""
    ct, density, labels, affine, centre = real
    g = Geometry.centered(1000.0, 64, 64, (5.0, 5.0), ap_pose(centre, 700.0, rotvec_deg=(2, 3, -5)))
    reference = Renderer(density, labels, affine, n_channels=14, method=method, device="cpu").render(g)
    # Flipped: reverse the array along i and k, and compensate in the affine.
    flipped = density[::-1, :, ::-1]
    flip = np.eye(4)
    flip[0, 0], flip[2, 2] = -1, -1
    flip[0, 3], flip[2, 3] = density.shape[2] - 1, density.shape[0] - 1
    same = Renderer(flipped, labels[::-1, :, ::-1], affine @ flip, n_channels=14, method=method,
                    device="cpu").render(g)
    np.testing.assert_allclose(same, reference, rtol=1e-4, atol=1e-4)
    # Rotating the grid (affine) and the camera by the same rigid motion leaves the DRR unchanged.
    motion = pose_from_params([20.0, -35.0, 50.0, 12.0, -7.0, 30.0])
    moved = Renderer(density, labels, motion @ affine, n_channels=14, method=method, device="cpu").render(
        g.with_pose(g.world_to_camera @ np.linalg.inv(motion)))
    np.testing.assert_allclose(moved, reference, rtol=1e-3, atol=1e-3)


def test_agrees_with_an_independent_projector_on_the_real_ct(real):
    """Zero-padded by 2 voxels, so that where each method ends the volume does not matter (the CT
    is cut through the body at its edges)."""
    ct, density, labels, affine, centre = real
    padded = sitk.ConstantPad(ct, (2, 2, 2), (2, 2, 2), -1000.0)
    density = np.clip(1000.0 + sitk.GetArrayFromImage(padded), 0, None).astype(np.float32)
    g = Geometry.centered(1000.0, 96, 96, (3.0, 3.0), ap_pose(centre, 650.0, rotvec_deg=(6, -4, 12),
                                                              shift_mm=(5, -8, 15)))
    reference = project({"d": density / 1000.0}, padded, g, step_mm=0.5)["d"]
    # The same model (trilinear interpolant), sampled differently: identical up to sampling.
    trilinear = Renderer(density, np.zeros(density.shape, np.uint8), index_to_world(padded), method="trilinear",
                         device="cpu").render(g)[0]
    assert ncc(trilinear, reference) > 0.99999
    assert trilinear.mean() == pytest.approx(reference.mean(), rel=1e-4)
    # Siddon's piecewise-constant voxels differ at sharp edges only; the same mass.
    siddon = Renderer(density, np.zeros(density.shape, np.uint8), index_to_world(padded), method="siddon",
                      device="cpu").render(g)[0]
    assert ncc(siddon, reference) > 0.99
    assert siddon.mean() == pytest.approx(reference.mean(), rel=1e-3)
