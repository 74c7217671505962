"""Names and file layout of demo cases, known before the cases exist (no heavy imports: the
Snakefile uses this to build the DAG)."""

from __future__ import annotations


def case_id(index: int) -> str:
    """The id of the demo cohort's ``index``-th case."""
    return f"demo_{index:03d}"


def case_files(index: int, nifti_png_every: int) -> dict[str, str]:
    """File names inside a demo case folder.

    Every ``nifti_png_every``-th case (indices n-1, 2n-1, ...) is written as NIfTI + PNG, every other
    one of those as NIfTI + JPEG; the rest as a DICOM CT series and a DICOM DX radiograph.
    """
    n = nifti_png_every
    if n > 0 and index % n == n - 1:
        jpeg = (index // n) % 2 == 1
        return {"ct": "ct.nii.gz", "xray": "xray.jpg" if jpeg else "xray.png", "labels": "labels.nii.gz"}
    return {"ct": "ct", "xray": "xray.dcm", "labels": "labels.nii.gz"}
