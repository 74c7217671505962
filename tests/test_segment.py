"""Segmentation with nnU-Net v2: a tiny model really trained and applied, label mapping, Dice and
surface distance, plausibility errors, and nnU-Net's environment kept inside the job's folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from bonedrr.errors import InputError
from bonedrr.labels import CANONICAL_LABELS, PRESETS, remap
from bonedrr.segment import (TrainSettings, check_plausible, compare_labels, median_hu_of, keep_largest_components, load_predictor,
                             nnunet_environment, overlay_png, predict_labels, resolve_mapping, train_segmenter, volumes_cm3)

from conftest import REAL_CT, REAL_LABELS, REPO


def _sphere(radius_mm: float, shape=(48, 48, 48), spacing=1.0) -> np.ndarray:
    z, y, x = (np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2) * spacing
    return np.sqrt(x ** 2 + y ** 2 + z ** 2) <= radius_mm


def test_dice_and_surface_distance_of_concentric_spheres():
    inner, outer = _sphere(10.0), _sphere(12.0)
    predicted = np.where(outer, CANONICAL_LABELS["femur_left"], 0).astype(np.uint8)
    reference = np.where(inner, CANONICAL_LABELS["femur_left"], 0).astype(np.uint8)
    m = compare_labels(predicted, reference, (1.0, 1.0, 1.0))
    assert list(m) == ["femur_left"]
    assert m["femur_left"]["dice"] == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))
    assert m["femur_left"]["dice"] == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 12 ** 3), abs=0.02)
    assert m["femur_left"]["assd_mm"] == pytest.approx(2.0, abs=0.35)  # the shells are 2 mm apart
    assert m["femur_left"]["volume_ratio"] == pytest.approx((12 / 10) ** 3, rel=0.05)
    assert compare_labels(reference, reference, (2.0, 2.0, 2.0))["femur_left"] == {
        "dice": 1.0, "assd_mm": 0.0, "hd95_mm": 0.0, "volume_ratio": 1.0}


def test_totalsegmentator_preset_makes_the_real_ct_labels_a_reference():
    ts = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_LABELS)))
    canonical = remap(ts, resolve_mapping("totalsegmentator_v2"))
    volumes = volumes_cm3(canonical, (3.0, 3.0, 3.0))
    assert volumes["femur_left"] == pytest.approx(4488 * 0.027) and volumes["hip_right"] == pytest.approx(13048 * 0.027)
    check_plausible(volumes)  # the real CT's labels pass the checks
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_CT)))
    median = median_hu_of(canonical, hu)
    assert median["femur_left"] > 150 and median["hip_right"] > 150, median  # bone, on the real CT
    check_plausible(volumes, median_hu=median)
    with pytest.raises(InputError, match="segmentation's femur_left has a median of -1000 HU, below 0 HU: not bone"):
        check_plausible(volumes, median_hu=median_hu_of(canonical, np.full_like(hu, -1000)))  # bone painted in air
    shifted = np.roll(canonical, 1, axis=2)  # one 3 mm voxel along x
    m = compare_labels(shifted, canonical, (3.0, 3.0, 3.0))
    femur = canonical == CANONICAL_LABELS["femur_right"]
    overlap = (femur & np.roll(femur, 1, axis=2)).sum()
    assert m["femur_right"]["dice"] == pytest.approx(overlap / femur.sum())
    assert 0.85 < m["femur_right"]["dice"] < 0.97 and 0.3 < m["femur_right"]["assd_mm"] < 3.0
    assert resolve_mapping({"7": "femur_left"}) == {7: "femur_left"}
    with pytest.raises(Exception, match="thigh_bone, which are not canonical labels"):
        resolve_mapping({7: "thigh_bone"})


def test_plausibility_errors_are_exact():
    v = dict.fromkeys(CANONICAL_LABELS, 0.0)
    with pytest.raises(InputError) as e:
        check_plausible(v)
    assert str(e.value) == "segmentation is empty: no canonical structure was found"
    v.update(femur_left=150.0, hip_left=300.0, hip_right=310.0)
    check_plausible(v, side="left")
    with pytest.raises(InputError) as e:
        check_plausible(v, side="right")
    assert str(e.value) == "segmentation has no femur_right (the case is measured on side 'right')"
    v.update(femur_right=4.2)
    with pytest.raises(InputError) as e:
        check_plausible(v, side="both")
    assert str(e.value) == "segmentation's femur_right is 4.2 cm3, outside the plausible range 20-1500 cm3"
    check_plausible(v, side="both", ranges={"femur": (1.0, 2000.0)})


def test_nnunet_environment_is_confined_and_restored(tmp_path):
    before, tempdir_before = dict(os.environ), tempfile.tempdir
    short = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))  # short enough for nnU-Net's Unix sockets
    with nnunet_environment(short / "work", processes=1) as folders:
        import nnunetv2.paths as paths

        assert str(paths.nnUNet_results) == str(folders["results"]) == os.environ["nnUNet_results"]
        assert tempfile.gettempdir() == str(short / "work" / "tmp") == os.environ["TMPDIR"]
        with tempfile.NamedTemporaryFile() as f:
            assert f.name.startswith(str(short / "work"))
    assert dict(os.environ) == before and tempfile.tempdir == tempdir_before
    deep = tmp_path / ("d" * 60) / "work"  # a socket path here would exceed AF_UNIX's 107 bytes
    with nnunet_environment(deep) as folders:
        from multiprocessing.connection import Listener

        assert folders["results"].parent == deep and len(str(folders["tmp"])) < 60
        Listener(family="AF_UNIX").close()
    assert dict(os.environ) == before and tempfile.tempdir == tempdir_before
    with pytest.raises(RuntimeError), nnunet_environment(tmp_path / "again"):
        raise RuntimeError("a failing job")
    assert dict(os.environ) == before


# --- a tiny nnU-Net, really trained -----------------------------------------------------------------

def _variant(ct: sitk.Image, labels: sitk.Image, shift_vox: int, hu_scale: float, folder, name):
    """The real CT at 6 mm, cropped at a shifted window and rescaled in HU: a different 'patient'."""
    ct6 = sitk.Resample(ct, [s // 2 for s in ct.GetSize()], sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(),
                        [6.0] * 3, ct.GetDirection(), -1024.0, sitk.sitkFloat32)
    lab6 = sitk.Resample(labels, ct6, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    region = [slice(shift_vox, None), slice(0, 48), slice(0, None)]  # [x, y, z] crop of the index grid
    ct6, lab6 = ct6[region[0], region[1], region[2]], lab6[region[0], region[1], region[2]]
    ct6 = sitk.Cast(ct6 * hu_scale, sitk.sitkFloat32)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct6, str(folder / f"{name}_ct.nii.gz"))
    sitk.WriteImage(lab6, str(folder / f"{name}_labels.nii.gz"))
    return folder / f"{name}_ct.nii.gz", folder / f"{name}_labels.nii.gz"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2D nnU-Net trained for 150 iterations on three variants of the real CT (6 mm voxels)."""
    d = tmp_path_factory.mktemp("tiny_nnunet")
    ct = sitk.ReadImage(str(REAL_CT))
    ts = sitk.ReadImage(str(REAL_LABELS))
    canonical = sitk.GetImageFromArray(remap(sitk.GetArrayFromImage(ts), PRESETS["totalsegmentator_v2"]))
    canonical.CopyInformation(ts)
    cases = [(f"v{i}", *_variant(ct, canonical, shift, scale, d / "data", f"v{i}"))
             for i, (shift, scale) in enumerate([(0, 1.0), (3, 0.95), (6, 1.05)])]
    test = _variant(ct, canonical, 2, 1.02, d / "data", "test")
    cwd = d / "cwd"
    cwd.mkdir()
    env_before = dict(os.environ)
    old = os.getcwd()
    os.chdir(cwd)  # nnU-Net must write nothing into the working directory
    try:
        settings = TrainSettings(trainer="nnUNetTrainerBonedrr", configuration="2d", sides="midline", epochs=30,
                                 iterations_per_epoch=5, val_iterations_per_epoch=1,
                                 device="cpu", patch_size=[48, 48], batch_size=8, base_features=16,
                                 max_features=64, processes=1, threads=2, seed=0)
        # seeded: an unseeded tiny model varies from run to run (its hemipelvis Dice 0.37-0.64 measured),
        # and whatever ran before in the session would decide
        record = train_segmenter(cases, d / "work", d / "model", settings)
    finally:
        os.chdir(old)
    return {"dir": d, "record": record, "test": test, "cwd": cwd, "env_before": env_before}


@pytest.mark.slow
def test_tiny_model_trains_within_its_folders(tiny_model):
    d, record = tiny_model["dir"], tiny_model["record"]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    assert env == {k: v for k, v in tiny_model["env_before"].items() if k != "PYTEST_CURRENT_TEST"}
    assert list(tiny_model["cwd"].iterdir()) == []
    assert sorted(p.name for p in d.iterdir()) == ["cwd", "data", "model"]  # the work folder is cleaned up
    model = d / "model"
    assert {p.name for p in model.iterdir()} >= {"plans.json", "dataset.json", "fold_all", "training.json"}
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    assert record["nnunet"]["trainer"] == "nnUNetTrainerBonedrr" and record["nnunet"]["epochs"] == 30
    assert record["nnunet"]["configuration"] == "2d" and record["nnunet"]["patch_size"] == [48, 48]
    assert record["cases"] == ["v0", "v1", "v2"]


@pytest.mark.slow
def test_tiny_model_segments_a_new_variant(tiny_model, tmp_path):
    ct_path, reference = tiny_model["test"]
    ct = sitk.ReadImage(str(ct_path))
    with nnunet_environment(tmp_path / "work"):
        predictor = load_predictor(tiny_model["dir"] / "model", "all", "cpu")
        labels = predict_labels(predictor, ct, resolve_mapping("canonical"))
    assert labels.GetSize() == ct.GetSize() and labels.GetDirection() == ct.GetDirection()
    m = compare_labels(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(sitk.ReadImage(str(reference))),
                       ct.GetSpacing()[::-1])
    # After 150 iterations the hemipelves are learnt (Dice 0.49 and 0.64 when measured), the femurs not
    # yet (0.02): the demo's model trains for 600 and is held to 0.9 on its held-out patients.
    hips = [m[k]["dice"] for k in ("hip_left", "hip_right")]
    assert np.mean(hips) > 0.4, m
    # each bone and muscle is one connected body (stray voxels would move the femoral head: see
    # keep_largest_components)
    predicted = sitk.GetArrayFromImage(labels)
    for name in ("femur_left", "femur_right", "hip_left", "hip_right", "iliopsoas_left", "iliopsoas_right"):
        mask = predicted == CANONICAL_LABELS[name]
        if mask.any():
            assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1, name
    overlay_png(ct, sitk.GetArrayFromImage(labels), tmp_path / "segmentation.png", "tiny")
    assert (tmp_path / "segmentation.png").stat().st_size > 20_000


@pytest.mark.slow
def test_an_empty_segmentation_is_a_clear_error(tiny_model, tmp_path):
    ct = sitk.ReadImage(str(tiny_model["test"][0]))
    air = sitk.Image(ct.GetSize(), sitk.sitkFloat32) - 1000.0  # a scan of nothing
    air.CopyInformation(ct)
    sitk.WriteImage(air, str(tmp_path / "ct.nii.gz"))
    result = subprocess.run(
        [sys.executable, "-m", "bonedrr", "segment", "--ct", str(tmp_path / "ct.nii.gz"), "--model",
         str(tiny_model["dir"] / "model"), "--out", str(tmp_path / "labels.nii.gz"), "--side", "left",
         "--device", "cpu", "--record", str(tmp_path / "segmentation.json")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert result.returncode == 2
    # Whether the barely trained model leaves an air scan empty, puts a stray voxel or a small blob in
    # it, or paints bone into the air, the case must fail with one of these exact messages (measured
    # with the seeded model: the last, femur_left at -1000 HU)
    prefix = re.escape(f"bonedrr segment: error: {tmp_path / 'ct.nii.gz'}: ")
    assert re.fullmatch(prefix + "(segmentation is empty: no canonical structure was found"
                        "|segmentation has no femur_left \\(the case is measured on side 'left'\\)"
                        "|segmentation's [a-z_]+ is [0-9.]+ cm3, outside the plausible range 40-1200 cm3"
                        "|segmentation's [a-z_]+ has a median of -?[0-9]+ HU, below 0 HU: not bone)",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (tmp_path / "labels.nii.gz").exists()
    assert json.loads((tmp_path / "segmentation.json").read_text())["plausible"] is False


def test_a_stray_voxel_does_not_move_the_femoral_head():
    """One voxel of "femur" predicted in the spine would be the femur's top, hence its head: removed,
    with the rest of the prediction untouched."""
    from bonedrr.labels import femoral_head_centre

    lab = np.zeros((100, 20, 40), np.uint8)  # k grows superior (identity affine)
    lab[10:50, 5:15, 5:15] = CANONICAL_LABELS["femur_left"]
    lab[10:50, 5:15, 25:35] = CANONICAL_LABELS["femur_right"]
    lab[95, 10, 10] = CANONICAL_LABELS["femur_left"]
    lab[60:70, 5:15, 5:35] = CANONICAL_LABELS["other_bone"]  # several bones: left as predicted
    lab[90, 0, 0] = CANONICAL_LABELS["other_bone"]
    cleaned = keep_largest_components(lab)
    assert femoral_head_centre(lab, "left", np.eye(4))[2] > 90
    assert femoral_head_centre(cleaned, "left", np.eye(4))[2] == pytest.approx(femoral_head_centre(
        cleaned, "right", np.eye(4))[2])
    assert cleaned[95, 10, 10] == 0 and cleaned[90, 0, 0] == CANONICAL_LABELS["other_bone"]
    assert (cleaned != lab).sum() == 1
