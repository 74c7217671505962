"""The ``bmd`` stage: a case's BMD targets per hip, measured on its CT and its DRR.

Three targets per hip (``bmd.json``; a cohort's in ``qc/bmd.tsv``):

* **DRR-BMD** (g/cm2), the paper's definition (Gu et al. 2023): the mean of the proximal-femur DRR
  channel over its projected bone area, the pixels above a threshold (config ``bmd.threshold_g_cm2``,
  default :data:`BMD_THRESHOLD_G_CM2`). :func:`drr_bmd` computes it on any 2D array: the full DRR here,
  a shard's crop, or a model's prediction.
* **QCT vBMD** (mg/cm3 hydroxyapatite): the mean HA-equivalent mineral of the proximal-femur region
  (``labels.proximal_femur_mask``, the femur within ``proximal_femur_cut_mm`` below the head's top), as a
  QCT workstation reports it: the calibration line applied to every voxel's CT number, negative values
  kept. ``calibrate`` measures exactly this (``calibration.json``, ``qct_vbmd_mg_cm3``) and the demo's
  truth is defined the same way; it is taken from there. ``density.nii.gz`` cannot give it: its bone
  voxels are clipped at 0 mg/cm3 for rendering, which raises the mean by up to 9 % on the demo (marrow
  and partial-volume voxels below the soft-tissue line). Without calibration.json the mean of the
  clipped density is recorded instead (``qct_vbmd_source`` says which).
* **DXA aBMD** (g/cm2) when the sample sheet gives it (``case.json``'s ``clinical``), else null.

Beside them, **DRR-vBMD** (mg/cm3, :func:`drr_vbmd`): the proximal femur's mineral over its volume, read
from its DRR and its thickness channel, as a decomposition can read it off a radiograph.

The projected femoral head centre (:func:`bonedrr.labels.femoral_head_centre` through the DRR's
registered geometry) is recorded too: the shards are cropped around it.

The default threshold, 0.05 g/cm2: on the 16-patient demo (32 hips, registered poses), DRR-BMD at 0.05
differs from the true DXA aBMD of each hip (the 80 mm region, projected) by 1.1 % on average and 2.9 % at
most (Pearson 0.999), from osteoporotic to normal (``results/demo/qc/bmd.tsv``); 0.3 g/cm2 (a value used
for a throwaway experiment, PEERS.md) cuts the thin cortex and the trochanteric edges and gives 4-23 %
more on three demo patients.

Example:
    >>> import numpy as np
    >>> drr = np.array([[0.0, 0.02, 0.6], [0.8, 1.0, 0.0]], np.float32)
    >>> round(drr_bmd(drr), 3)  # mean of 0.6, 0.8 and 1.0
    0.8
    >>> drr_bmd(np.zeros((2, 2)))
    nan
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bonedrr.errors import InputError
from bonedrr.labels import SIDES

# The CLI imports this module for its defaults: image libraries are imported where they are used.

#: The DRR channel BMD is read from (the proximal femur, DESIGN.md).
BMD_CHANNEL = "proximal_femur"
#: Default projected-bone threshold of DRR-BMD, g/cm2 (config ``bmd.threshold_g_cm2``).
BMD_THRESHOLD_G_CM2 = 0.05
#: The channel of the proximal femur's projected thickness (cm): each ray's chord through it
#: (:mod:`bonedrr.drr`). With the proximal-femur channel it gives the volumetric density, :func:`drr_vbmd`.
THICKNESS_CHANNEL = "proximal_femur_thickness"


def drr_bmd(proximal_femur_drr: np.ndarray, threshold_g_cm2: float = BMD_THRESHOLD_G_CM2) -> float:
    """DRR-BMD (g/cm2): mean of a proximal-femur DRR over its pixels above ``threshold_g_cm2``.

    Args:
        proximal_femur_drr: 2D array in g/cm2 (a whole DRR channel, a crop, or a prediction).
        threshold_g_cm2: Pixels at or below it are not projected bone.

    Returns:
        The mean, or NaN when no pixel is above the threshold.
    """
    a = np.asarray(proximal_femur_drr, np.float64)
    above = a > threshold_g_cm2
    return float(a[above].mean()) if above.any() else float("nan")


def drr_vbmd(proximal_femur_drr: np.ndarray, thickness: np.ndarray,
             threshold_g_cm2: float = BMD_THRESHOLD_G_CM2) -> float:
    """DRR-vBMD (mg/cm3): the proximal femur's mineral over its volume, read from two projections.

    Over the projected bone area of :func:`drr_bmd` (the same pixels), the sum of the areal density
    (g/cm2) is the mineral a pixel's rays cross, and the sum of the thickness (cm, each ray's chord
    through the region) is the volume they cross: their ratio is the region's mean density, which
    QCT vBMD measures and DRR-BMD does not (it also grows with the bone's thickness). The density
    is the rendered one (bone voxels clipped at 0 mg/cm3), so it runs a few % above a QCT
    workstation's mean; validation maps it to QCT through a line fitted on the training folds.

    Args:
        proximal_femur_drr: 2D array in g/cm2.
        thickness: The same pixels' chord lengths through the proximal femur, cm (:data:`THICKNESS_CHANNEL`).
        threshold_g_cm2: As in :func:`drr_bmd`.

    Returns:
        mg/cm3, or NaN when no pixel is above the threshold or the thickness there sums to 0.

    Example:
        >>> import numpy as np
        >>> round(drr_vbmd(np.array([[0.6, 1.2, 0.0]]), np.array([[2.0, 4.0, 0.5]])), 1)  # 1.8 g/cm2 over 6 cm
        300.0
    """
    a = np.asarray(proximal_femur_drr, np.float64)
    above = a > threshold_g_cm2
    length = float(np.asarray(thickness, np.float64)[above].sum())
    return 1000.0 * float(a[above].sum()) / length if above.any() and length > 0 else float("nan")


def drr_vbmd_of(channels, drrs: np.ndarray, threshold_g_cm2: float = BMD_THRESHOLD_G_CM2) -> np.ndarray | None:
    """:func:`drr_vbmd` of each of ``drrs`` (N, C, H, W) whose C channels are named ``channels`` (true
    crops or a model's predictions); None without the proximal-femur and thickness channels."""
    channels = list(channels)
    if THICKNESS_CHANNEL not in channels or BMD_CHANNEL not in channels:
        return None
    k, t = channels.index(BMD_CHANNEL), channels.index(THICKNESS_CHANNEL)
    return np.array([drr_vbmd(d[k], d[t], threshold_g_cm2) for d in drrs], float)


def sides_of(case_record: dict) -> list[str]:
    """The hips a case is measured on: its sample-sheet ``side`` (``both`` = left and right)."""
    side = case_record.get("side", "both")
    return list(SIDES) if side == "both" else [side]


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def measure_case(density_path: str | Path, labels_path: str | Path, drr_path: str | Path, case_record: dict, *,
                 calibration: dict | None = None, threshold_g_cm2: float = BMD_THRESHOLD_G_CM2,
                 cut_mm: float = 80.0) -> dict:
    """BMD targets and the projected femoral head of each hip of a case (the ``bmd.json`` record).

    Raises:
        InputError: The DRR lacks a proximal-femur channel, or the grids of density and labels differ.
    """
    import SimpleITK as sitk

    from bonedrr.drr import read_drr
    from bonedrr.geometry import Geometry
    from bonedrr.images import index_to_world, world_axis_grid
    from bonedrr.labels import femoral_head_centre, proximal_femur_mask

    density_image = sitk.ReadImage(str(density_path), sitk.sitkFloat32)
    labels_image = sitk.ReadImage(str(labels_path))
    if labels_image.GetSize() != density_image.GetSize():
        raise InputError(f"label grid {labels_image.GetSize()} differs from the density's "
                         f"{density_image.GetSize()}", labels_path)
    density = sitk.GetArrayFromImage(density_image)
    labels = sitk.GetArrayFromImage(labels_image)
    superior = world_axis_grid(labels_image, 2)
    drr = read_drr(drr_path)
    geometry = Geometry.from_dict(drr["geometry"])
    clinical = case_record.get("clinical", {})
    calibrated = (calibration or {}).get("qct_vbmd_mg_cm3")
    if calibrated is not None and (calibration or {}).get("proximal_femur_cut_mm", cut_mm) != cut_mm:
        calibrated = None  # measured on another region
    sides = {}
    for side in sides_of(case_record):
        channel = f"proximal_femur_{side}"
        if channel not in drr["channels"]:
            raise InputError(f"no DRR channel {channel!r} (channels: {', '.join(drr['channels'])})", drr_path)
        image = drr["drr"][drr["channels"].index(channel)]
        thickness = f"proximal_femur_thickness_{side}"
        vbmd = (drr_vbmd(image, drr["drr"][drr["channels"].index(thickness)], threshold_g_cm2)
                if thickness in drr["channels"] else math.nan)  # NaN: a drr.h5 rendered before the channel
        region = proximal_femur_mask(labels, side, superior, cut_mm)
        head = femoral_head_centre(labels, side, index_to_world(labels_image))
        sides[side] = {
            "drr_bmd_g_cm2": _number(drr_bmd(image, threshold_g_cm2)),
            "projected_area_px": int((image > threshold_g_cm2).sum()),
            "drr_vbmd_mg_cm3": _number(vbmd),
            "qct_vbmd_mg_cm3": (_number(calibrated.get(side)) if calibrated is not None
                                else float(density[region].mean()) if region.any() else None),
            "qct_vbmd_source": "calibration.json" if calibrated is not None else "density (clipped at 0)",
            "dxa_abmd_g_cm2": _number(clinical.get(f"dxa_abmd_{side}")),
            "sample_sheet_qct_vbmd_mg_cm3": _number(clinical.get(f"qct_vbmd_{side}")),
            "femoral_head_world_mm": None if head is None else [round(float(v), 3) for v in head],
            "femoral_head_px": None if head is None else [round(float(v), 3) for v in geometry.project(head)],
        }
    return {"case_id": case_record.get("case_id"), "threshold_g_cm2": threshold_g_cm2,
            "proximal_femur_cut_mm": cut_mm, "units": {"drr_bmd": "g/cm2", "drr_vbmd": "mg/cm3", "qct_vbmd": "mg/cm3 HA",
                                                        "dxa_abmd": "g/cm2", "femoral_head_px": "(row, col)"},
            "sides": sides}


def bmd_case(density_path, labels_path, drr_path, case_json, out_path, *, calibration_json=None,
             threshold_g_cm2=BMD_THRESHOLD_G_CM2, cut_mm: float = 80.0) -> dict:
    """Measure a case (:func:`measure_case`) and write ``bmd.json`` atomically."""
    from bonedrr.images import write_json

    calibration = json.loads(Path(calibration_json).read_text()) if calibration_json else None
    record = measure_case(density_path, labels_path, drr_path, json.loads(Path(case_json).read_text()),
                          calibration=calibration, threshold_g_cm2=threshold_g_cm2, cut_mm=cut_mm)
    write_json(out_path, record)
    return record


def bmd_summary(case_dirs, out_tsv) -> None:
    """A cohort's BMD targets, one row per hip; with the demo's truth where ``demo_input`` holds it."""
    from bonedrr.images import atomic_path

    rows = ["case_id\tside\tdrr_bmd_g_cm2\tqct_vbmd_mg_cm3\tdxa_abmd_g_cm2\ttrue_qct_vbmd_mg_cm3\t"
            "true_dxa_abmd_g_cm2\tdrr_vbmd_mg_cm3"]

    def cell(v, digits):
        return "" if v is None else f"{v:.{digits}f}"

    for d in map(Path, case_dirs):
        record = json.loads((d / "bmd.json").read_text())
        truth_path = d.parent / "demo_input" / d.name / "truth.json"
        truth = json.loads(truth_path.read_text()) if truth_path.exists() else {}
        for side, s in record["sides"].items():
            rows.append("\t".join([d.name, side, cell(s["drr_bmd_g_cm2"], 4), cell(s["qct_vbmd_mg_cm3"], 1),
                                   cell(s["dxa_abmd_g_cm2"], 4),
                                   cell(truth.get("qct_vbmd_mg_cm3", {}).get(side), 1),
                                   cell(truth.get("dxa_abmd_noiseless_g_cm2", {}).get(side), 4),
                                   cell(s.get("drr_vbmd_mg_cm3"), 1)]))
    with atomic_path(out_tsv) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
