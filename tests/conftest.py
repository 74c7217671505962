"""Shared fixtures: the real CT (vendored template), a DICOM copy of it, and one small demo case."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.dicom import write_ct_series

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO / "resources" / "totalseg_example" / "ct.nii.gz"
REAL_LABELS = REPO / "resources" / "totalseg_example" / "labels.nii.gz"
PHI = {"PatientName": "Quispe^Ingrid", "PatientID": "MRN7654321", "PatientBirthDate": "19480317",
       "InstitutionName": "Saint Example Hospital", "AccessionNumber": "ACC998877"}


@pytest.fixture(scope="session")
def real_ct() -> sitk.Image:
    return sitk.ReadImage(str(REAL_CT))


@pytest.fixture(scope="session")
def real_ct_dicom(tmp_path_factory, real_ct) -> Path:
    """The real CT written as a DICOM series (with made-up patient tags); read-only: copy to modify."""
    folder = tmp_path_factory.mktemp("real_dicom") / "ct"
    write_ct_series(folder, sitk.Cast(real_ct, sitk.sitkFloat32), PHI, key="test/real")
    return folder


@pytest.fixture
def dicom_copy(tmp_path, real_ct_dicom) -> Path:
    """A writable copy of the real CT's DICOM series."""
    return Path(shutil.copytree(real_ct_dicom, tmp_path / "ct"))


@pytest.fixture(scope="session")
def demo_cases(tmp_path_factory):
    """Two small virtual patients: index 0 (DICOM CT + DX) and index 1 (NIfTI + PNG)."""
    from bonedrr.demo.cohort import DemoSettings, make_case
    from bonedrr.demo.naming import case_id

    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(seed=7, rows=96, cols=160, pixel_mm=(2.8, 2.8), nifti_png_every=2)
    truths = [make_case(out / case_id(i), case_id(i), i, settings) for i in range(2)]
    return out, settings, truths


def hu_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)


@pytest.fixture(scope="session")
def demo_case_with_views(demo_cases, tmp_path_factory):
    """demo_cases' first patient made again with two extra views (``views/``): its folder."""
    import dataclasses

    from bonedrr.demo.cohort import make_case

    folder, settings, _ = demo_cases
    case = tmp_path_factory.mktemp("views") / "demo_000"
    make_case(case, "demo_000", 0, dataclasses.replace(settings, extra_views=2))
    return case


def tiny_workflow_config() -> dict:
    """The whole workflow in minutes: a demo cohort of two small virtual patients, a seconds-long
    nnU-Net (demo_000 trains it; the true labels go downstream, its own are too rough for the later
    stages' checks), two folds of one patient each (seed 1 puts demo_000 and demo_001 apart), tiny
    decomposition models and a two-point JPEG sweep."""
    return {
        "cohorts": {"tiny": {
            "demo": {"n_patients": 2, "seed": 5, "rows": 48, "cols": 80, "nifti_png_every": 2},
            "xray": {"sdd_mm": 1100, "pixel_mm": [5.6, 5.6]},
            "segmentation": {"model": "train", "training_cases": 1, "trainer": "nnUNetTrainerBonedrr",
                             "configuration": "2d", "sides": "midline", "epochs": 2, "iterations_per_epoch": 3,
                             "val_iterations_per_epoch": 1, "labels_downstream": "reference",
                             "plans": {"target_spacing_mm": 9.0, "patch_size": [48, 48], "batch_size": 4,
                                       "base_features": 8, "max_features": 32}}}},
        "shards": {"folds": 2, "seed": 1, "crop_px": [64, 32]},
        "train": {"stages": [{"channels": ["pelvis", "femur", "bone", "muscle"], "epochs": 2},
                             {"channels": ["proximal_femur"], "epochs": 2}],
                  "network": {"base_channels": 4, "depth": 2}, "locator": {"epochs": 1, "base_channels": 4},
                  "batch_size": 2, "lr": 0.02},
        "validate": {"jpeg_qualities": [50, 5], "examples": 1},
    }
