"""The validation stage on a real tiny cohort: two virtual patients taken through ingest, calibration,
DRRs (at the true pose, standing in for registration), BMD targets and packing; one tiny model per
held-out fold, trained by bonedrr.train; then validated end to end."""

import csv
import json
import shutil

import numpy as np
import pytest

from bonedrr import validate as v
from bonedrr.dataset import ShardDataset
from bonedrr.errors import BonedrrError

pytestmark = pytest.mark.slow

PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200, 400, 800]}
TINY_TRAINING = {"stages": [{"channels": ["pelvis", "femur", "bone", "muscle"], "epochs": 3},
                            {"channels": ["proximal_femur", "proximal_femur_thickness"], "epochs": 8}],
                 "network": {"base_channels": 4, "depth": 2}, "locator": {"epochs": 1, "base_channels": 4},
                 "batch_size": 2, "lr": 0.02}


@pytest.fixture(scope="module")
def cohort(demo_cases, demo_case_with_views, tmp_path_factory):
    """results/tiny/<case>/ (every stage's files), shards with one patient per fold, demo_input/ with the
    first patient's extra views, and the two fold models."""
    from bonedrr.bmd import bmd_case
    from bonedrr.calibrate import calibrate_case
    from bonedrr.drr import render_case, write_drr
    from bonedrr.geometry import Geometry
    from bonedrr.images import write_json
    from bonedrr.ingest import ingest_case
    from bonedrr.shards import PackSettings, fold_of, pack_cohort
    from bonedrr.train import train_model

    folder, settings, truths = demo_cases
    root = tmp_path_factory.mktemp("validation")
    demo_root = root / "demo_input"
    shutil.copytree(demo_case_with_views, demo_root / "demo_000")
    shutil.copytree(folder / "demo_001", demo_root / "demo_001")
    results = root / "results" / "tiny"
    for truth in truths:
        case, src = truth["case_id"], demo_root / truth["case_id"]
        out = results / case
        files = truth["files"]
        ingest_case(case, src / files["ct"], src / files["xray"], out, labels=src / "labels.nii.gz",
                    pixel_mm=settings.pixel_mm, sdd_mm=settings.sdd_mm, clinical=truth["clinical"], cohort="tiny")
        calibrate_case(out / "ct.nii.gz", src / "labels.nii.gz", out, PHANTOM)
        write_json(out / "pose.json", {"geometry": truth["geometry"], "converged": True, "similarity_value": 1.0,
                                       "qa_flags": []})
        write_drr(out / "drr.h5", render_case(out / "density.nii.gz", src / "labels.nii.gz",
                                              Geometry.from_dict(truth["geometry"]), device="cpu"))
        shutil.copy(src / "labels.nii.gz", out / "labels.nii.gz")
        bmd_case(out / "density.nii.gz", out / "labels.nii.gz", out / "drr.h5", out / "case.json", out / "bmd.json",
                 calibration_json=out / "calibration.json")
    seed = next(s for s in range(100) if fold_of("demo_000", 2, s) != fold_of("demo_001", 2, s))
    pack = PackSettings(crop_px=(64, 32), folds=2, seed=seed)
    pack_cohort([results / t["case_id"] for t in truths], results / "shards", pack, cohort="tiny")
    models = root / "results" / "models"
    for k in (0, 1):
        train_model(results / "shards", models / f"tiny_fold{k}", TINY_TRAINING, folds=[1 - k], device="cpu",
                    progress=False)
    return {"results": results, "demo_root": demo_root, "models": [models / "tiny_fold0", models / "tiny_fold1"],
            "truths": truths}


@pytest.fixture(scope="module")
def validated(cohort):
    out = cohort["results"].parent.parent / "validation" / "tiny"
    settings = v.ValidationSettings(jpeg_qualities=(90, 10, 1), examples=2)
    result = v.validate_cohort(cohort["results"] / "shards", cohort["models"], out, cases_root=cohort["results"],
                               demo_root=cohort["demo_root"], default_pixel_mm=(2.8, 2.8), settings=settings,
                               cohort="tiny", progress=False)
    return out, result


def test_every_hip_is_predicted_once_by_the_model_that_never_saw_its_patient(cohort, validated):
    out, result = validated
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    index = {r["sample_id"]: r for r in ShardDataset(cohort["results"] / "shards").index}
    assert sorted(r["sample_id"] for r in rows) == sorted(index)
    from bonedrr.bmd import drr_bmd, drr_vbmd
    from bonedrr.train import load_model

    for r in rows:
        fold = int(r["fold"])
        assert fold == int(index[r["sample_id"]]["fold"])
        assert result["per_fold"][r["fold"]]["train_folds"] == [1 - fold]
        assert float(r["true_drr_bmd"]) == pytest.approx(float(index[r["sample_id"]]["drr_bmd_g_cm2"]), rel=1e-5)
        # The prediction is the held-out fold's model's, read off its proximal-femur channel.
        model = load_model(cohort["models"][fold])
        data = ShardDataset(cohort["results"] / "shards", folds=[fold])
        item = data[[x["sample_id"] for x in data.index].index(r["sample_id"])]
        scale = model.scale_of(item["overview"].numpy())  # (1, 128, 256): the whole radiograph's
        pred = model.predict(item["xray"][0].numpy()[None], scale)[0]
        pf, thickness = pred[model.channels.index("proximal_femur")], pred[model.channels.index("proximal_femur_thickness")]
        found = float(r["pred_drr_bmd"]) if r["pred_drr_bmd"] else np.nan
        assert found == pytest.approx(drr_bmd(pf), rel=1e-5, nan_ok=True)
        # QCT is read from the predicted DRR-vBMD (mineral over volume), through the line fitted on the
        # training fold's DRR-vBMD; the DRR-BMD line to QCT is reported beside it.
        found = float(r["pred_drr_vbmd"]) if r["pred_drr_vbmd"] else np.nan  # NaN: no predicted bone
        assert found == pytest.approx(drr_vbmd(pf, thickness), rel=1e-5, nan_ok=True)
        line = result["per_fold"][r["fold"]]["model_calibration"]["qct_vbmd"]
        qct = float(r["pred_qct_vbmd"]) if r["pred_qct_vbmd"] else np.nan
        expected = line["slope"] * found + line["intercept"] if line else np.nan  # None: no training hip read
        assert qct == pytest.approx(expected, rel=1e-5, nan_ok=True)
        assert np.isnan(qct) or float(r["pred_qct_vbmd_from_drr_bmd"]) != qct
        # the true crops' DRR-vBMD is the hip's QCT vBMD but for the rendering's clipping of bone voxels at 0
        assert float(r["true_drr_vbmd"]) == pytest.approx(float(r["true_qct_vbmd"]), rel=0.12)
    # metrics.json is strict JSON (no NaN), and names the ICC it reports.
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert metrics["definitions"]["icc"].startswith("ICC(2,1)")
    assert metrics["qct_readout"] == "drr_vbmd" and metrics["qct_from_drr_bmd"]["ceiling"]["n"] == 4
    assert metrics["baseline"]["drr_bmd"]["n"] == 4


def test_baseline_and_calibrations_are_fitted_on_the_training_folds_only(cohort, validated):
    _, result = validated
    shards = cohort["results"] / "shards"
    for fold in (0, 1):
        train = v.load_samples(ShardDataset(shards, exclude_folds=[fold]))
        everything = v.load_samples(ShardDataset(shards))
        fit = result["per_fold"][str(fold)]["baseline_fit"]["qct_vbmd"]
        x = v.roi_intensity(train["xray"], train["mask"], train["overview"])
        slope, intercept = np.polyfit(x, train["qct_vbmd"], 1)
        assert (fit["slope"], fit["intercept"]) == pytest.approx((slope, intercept), rel=1e-9)
        assert fit["n"] == 2
        # A fit that leaked the held-out fold would be another line.
        leaky = np.polyfit(v.roi_intensity(everything["xray"], everything["mask"], everything["overview"]),
                           everything["qct_vbmd"], 1)
        assert not np.allclose(leaky, (slope, intercept), rtol=1e-3)


def test_jpeg_recrop_is_the_shards_crop_and_reaches_50x(cohort, validated):
    from bonedrr.validate import _case_radiograph, _pack_settings, jpeg_roundtrip, recrop

    shards = cohort["results"] / "shards"
    data = ShardDataset(shards)
    pack = _pack_settings(shards)
    for i, row in enumerate(data.index):
        image, pixel_mm, bmd = _case_radiograph(cohort["results"] / row["case_id"])
        crop = recrop(image, pixel_mm, bmd["sides"][row["side"]]["femoral_head_px"], row["side"], pack)
        np.testing.assert_allclose(crop, data[i]["xray"][0].numpy(), rtol=1e-5, atol=1e-3)
    # A demo-sized radiograph (192 x 320, the demo's own) at the sweep's lowest quality.
    from bonedrr.demo.cohort import DemoSettings  # noqa: F401  (the demo's default size)
    from bonedrr.demo.naming import DEFAULTS
    image, _, _ = _case_radiograph(cohort["results"] / "demo_000")
    from scipy import ndimage
    demo_sized = ndimage.zoom(image, (DEFAULTS["rows"] / image.shape[0], DEFAULTS["cols"] / image.shape[1]), order=1)
    _, size = jpeg_roundtrip(demo_sized, min(v.DEFAULT_QUALITIES))
    assert size["ratio_raw8"] >= 50
    # 1/50 exactly: the highest quality that compresses this radiograph 50x or more
    q50 = v.quality_for_ratio(demo_sized, 50)
    assert jpeg_roundtrip(demo_sized, q50)[1]["ratio_raw8"] >= 50 > jpeg_roundtrip(demo_sized, q50 + 1)[1]["ratio_raw8"]
    _, result = validated
    assert [e["quality"] for e in result["jpeg"]] == [90, 10, 1, None]  # the fixed qualities, then 1/50
    ratios = [e["ratio_raw8"] for e in result["jpeg"][:3]]
    assert ratios == sorted(ratios) and ratios[0] > 2
    at_50 = result["jpeg"][3]
    assert at_50["target_ratio"] == 50 and at_50["min_ratio_raw8"] >= 50 and at_50["n_short_of_ratio"] == 0
    assert 1 <= at_50["qualities"][0] <= at_50["qualities"][1] <= 95
    # the JPEG target is read at 1/50: the change of r against QCT there
    target = result["targets"]["jpeg_1_50"]
    assert target["value"] == pytest.approx(abs(at_50["qct_vbmd"]["pearson_r"] - result["model"]["qct_vbmd"]["pearson_r"]))
    assert target["met"] == (target["value"] <= 0.02)
    out, _ = validated
    with open(out / "jpeg.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * len(data) and {r["quality"] for r in rows if not r["target_ratio"]} == {"90", "10", "1"}
    for r in rows:
        if r["target_ratio"]:  # each radiograph at its own quality, the highest that reaches 50x
            image, _, _ = _case_radiograph(cohort["results"] / r["case_id"])
            assert int(r["quality"]) == v.quality_for_ratio(image, 50) and float(r["ratio_raw8"]) >= 50
    assert {(r["case_id"], r["side"]) for r in rows} == {(r["case_id"], r["side"]) for r in data.index}
    assert all(float(r["pred_drr_vbmd"]) > 0 for r in rows)  # QCT read from DRR-vBMD after JPEG too


def test_estimate_prints_the_volumetric_density_of_a_model_that_predicts_thickness(cohort):
    from bonedrr.estimate import describe, estimate

    xray = next((cohort["demo_root"] / "demo_001").glob("xray.*"))
    result = estimate(cohort["models"][0], xray, pixel_mm=(2.8, 2.8))
    for side, hip in result["sides"].items():
        assert hip["drr_vbmd_mg_cm3"] is None or hip["drr_vbmd_mg_cm3"] > 0
    assert "mg/cm3 (DRR-vBMD)" in describe(result)


def test_pose_sweep_measures_each_hip_on_every_radiograph(validated):
    out, result = validated
    pose = result["pose"]
    # demo_000: its own radiograph and two extra views, both hips; demo_001 has no views.
    assert pose["bmd_true_hips"]["n_subjects"] == 2 and pose["bmd_true_hips"]["n_measurements"] == 6
    assert 0 <= pose["bmd_true_hips"]["rms_cv"] < 1
    assert pose["radiographs_per_hip"] == 3
    # the truth's own change with the pose: demo_000's DRRs rendered at each radiograph's true pose
    assert pose["true_drr_bmd"]["n_subjects"] == 2 and pose["true_drr_bmd"]["n_measurements"] == 6
    assert 0.001 < pose["true_drr_bmd"]["rms_cv"] < 0.2
    with open(out / "pose.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case_id"], r["file"]) for r in rows if r["side"] == "right"] == [
        ("demo_000", "xray.dcm"), ("demo_000", "view1.dcm"), ("demo_000", "view2.dcm")]
    assert all(float(r["bmd_located_hips"]) > 0 and float(r["true_drr_bmd"]) > 0 for r in rows)


def test_true_drr_bmd_by_pose_is_the_pipelines_drr_bmd_at_the_cases_own_pose(cohort):
    case = cohort["results"] / "demo_000"
    by_pose = v.true_drr_bmd_by_pose(case, cohort["demo_root"] / "demo_000", threshold=0.05)
    assert len(by_pose) == 3  # the case's radiograph and its two views
    sides = json.loads((case / "bmd.json").read_text())["sides"]
    for side in ("right", "left"):
        assert by_pose[0][side] == pytest.approx(sides[side]["drr_bmd_g_cm2"], rel=1e-6)
        assert by_pose[1][side] != pytest.approx(by_pose[0][side], rel=1e-4)  # another pose, another projection


def test_report_is_self_contained_and_carries_no_patient_data(cohort, validated):
    import pydicom

    out, _ = validated
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "src=\"http" not in page and "<script" not in page
    ds = pydicom.dcmread(cohort["demo_root"] / "demo_000" / "xray.dcm")
    for secret in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.InstitutionName)):
        assert secret not in page and secret not in (out / "predictions.csv").read_text()
    for name in ("scatter", "bland_altman", "examples", "jpeg", "pose"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000


def test_a_model_that_saw_the_held_out_patients_is_refused(cohort, tmp_path):
    from bonedrr.errors import BonedrrError

    wrong = shutil.copytree(cohort["models"][1], tmp_path / "tiny_fold0")  # trained on fold 0
    with pytest.raises(BonedrrError, match=r"the model of fold 0 was trained on 1 of its held-out patients "
                                           r"\(demo_00[01]\)"):
        v.validate_cohort(cohort["results"] / "shards", [wrong], tmp_path / "out", progress=False)


def test_targets_are_unknown_where_a_correlation_is_undefined():
    def agreement(r):
        return {"pearson_r": r, "icc_2_1": r}

    def result(r_qct, r_qct_jpeg):
        return {"model": {"qct_vbmd": agreement(r_qct), "drr_bmd": agreement(0.97)},
                "baseline": {"qct_vbmd": agreement(0.5), "drr_bmd": agreement(float("nan"))},
                "jpeg": [{"quality": None, "target_ratio": 50.0, "n": 40, "n_short_of_ratio": 0, "min_ratio_raw8": 50.2,
                          "qct_vbmd": agreement(r_qct_jpeg)}],
                "pose": {"bmd_located_hips": {"rms_cv": 0.031}}}

    t = v.check_targets(result(0.93, 0.915))
    assert (t["pearson_r_qct_vbmd"]["met"], t["icc_qct_vbmd"]["met"], t["pearson_r_drr_bmd"]["met"]) == (False, True, True)
    assert t["above_baseline_qct_vbmd"]["met"] is True and t["above_baseline_drr_bmd"]["met"] is None
    assert t["jpeg_1_50"]["value"] == pytest.approx(0.015) and t["jpeg_1_50"]["met"] is True
    assert t["pose_rms_cv"]["met"] is False
    # too few held-out hips for a correlation: every target that needs it is unknown, not failed
    t = v.check_targets(result(float("nan"), 0.9))
    assert [t[k]["met"] for k in ("pearson_r_qct_vbmd", "icc_qct_vbmd", "above_baseline_qct_vbmd", "jpeg_1_50")] == [
        None] * 4
    # radiographs too small to compress 50x: unknown, and the target says why
    r = result(0.93, 0.92)
    r["jpeg"][0].update(n_short_of_ratio=3, min_ratio_raw8=31.4)
    t = v.check_targets(r)
    assert t["jpeg_1_50"]["met"] is None and "3 of 40 radiographs do not compress 50x even at quality 1, down to 31x" \
        in t["jpeg_1_50"]["target"]
    # a sweep without the 1/50 point says so
    r = result(0.93, 0.92)
    r["jpeg"][0].update(quality=10, target_ratio=None)
    t = v.check_targets(r)
    assert t["jpeg_1_50"]["met"] is None and "validate.jpeg_ratios lacks 50" in t["jpeg_1_50"]["target"]


def test_validation_settings_refuse_a_jpeg_sweep_that_cannot_be_made():
    with pytest.raises(BonedrrError, match=r"jpeg_ratios must be compression ratios above 1 .* not \[50.0, 0.5\]"):
        v.ValidationSettings(jpeg_ratios=(50, 0.5))
    with pytest.raises(BonedrrError, match=r"jpeg_qualities must be Pillow qualities 1-100, not \[95, 0\]"):
        v.ValidationSettings(jpeg_qualities=(95, 0))
    assert v.ValidationSettings(jpeg_qualities=(), jpeg_ratios=[50, 100]).jpeg_ratios == (50.0, 100.0)
