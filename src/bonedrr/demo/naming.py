"""Names, file layout and default settings of demo cases, known before the cases exist (no heavy
imports: the Snakefile and the config loader use this)."""

from __future__ import annotations

#: Defaults of a demo cohort's settings (config keys ``demo.*`` and ``xray.*``). The detector sees
#: 370 x 220 mm at the hips (magnification about 1.2): both proximal femurs with margin.
DEFAULTS = {
    "seed": 2026, "rows": 192, "cols": 320, "pixel_mm": (1.4, 1.4), "sdd_mm": 1100.0,
    "nifti_png_every": 5, "abmd_range": (0.45, 1.15), "template": None,
    "extra_views": 3,  # the workflow's demo default (DemoSettings' own default is 0: no views)
    "views_protocol": "same",
    "sites": 0,  # every case its own exposure protocol (DemoSettings.sites)
    "presentation": "processed",  # radiographs as a DX workstation presents them (DemoSettings.presentation)
    "phantom_rods_mg_cm3": (0.0, 100.0, 200.0, 400.0, 800.0),  # hydroxyapatite rods in water-like resin
}

#: Segmentation of a demo cohort without a ``segmentation`` block (config/config.yaml states the same):
#: the first 6 virtual patients train a small 2D nnU-Net (axial slices at 4.5 mm, a few minutes on two
#: CPU cores), which then segments every patient; the others are its held-out test cases.
SEGMENTATION_DEFAULTS = {
    "model": "train", "preset": "canonical", "training_cases": 6, "trainer": "nnUNetTrainerBonedrr",
    "configuration": "2d", "sides": "midline", "epochs": 80,
    "iterations_per_epoch": 15, "val_iterations_per_epoch": 2,
    "plans": {"target_spacing_mm": 4.5, "patch_size": [96, 96], "batch_size": 8, "base_features": 16,
              "max_features": 128},
}


def case_id(index: int) -> str:
    """The id of the demo cohort's ``index``-th case."""
    return f"demo_{index:03d}"


def case_files(index: int, nifti_png_every: int, presentation: str = "processed") -> dict[str, str]:
    """File names inside a demo case folder.

    Every ``nifti_png_every``-th case (indices n-1, 2n-1, ...) is written as NIfTI + PNG, every other
    one of those as NIfTI + JPEG (a PNG for a ``raw`` presentation: 8 bits cannot hold a detector's
    log scale); the rest as a DICOM CT series and a DICOM DX radiograph.
    """
    n = nifti_png_every
    if n > 0 and index % n == n - 1:
        jpeg = (index // n) % 2 == 1 and presentation != "raw"
        return {"ct": "ct.nii.gz", "xray": "xray.jpg" if jpeg else "xray.png", "labels": "labels.nii.gz"}
    return {"ct": "ct", "xray": "xray.dcm", "labels": "labels.nii.gz"}
