"""The ``calibrate`` stage: CT numbers (HU) to density, as quantitative CT (QCT) does it.

Output density (``density.nii.gz``, float32, mg/cm3):

* bone voxels (labels ``femur_*``, ``hip_*``, ``other_bone``): hydroxyapatite-equivalent mineral
  density, ``(HU - intercept) / slope`` (the QCT convention), clipped at 0 (a negative mineral
  density is marrow fat, not mineral);
* every other voxel: mass density, ``1000 + true HU`` mg/cm3 (water 1000, fat about 900, air 0),
  where the scanner's HU are first brought to a reference scanner's scale:
  ``true HU = (HU - intercept) * reference_ha_hu_per_mg_cm3 / slope``.

The calibration line ``HU = intercept + slope * (mg/cm3 HA)`` comes from one of three methods, chosen
per cohort (config ``calibration.method``):

* ``phantom``: the rods of a calibration phantom scanned with the patient are found, their mean HU
  fitted against their known densities (the resin around them is one more point); the fit and its
  residuals are recorded.
* ``scanner``: documented per-scanner coefficients from config (``calibration.scanners``), chosen by the
  sample sheet's ``scanner`` column.
* ``internal`` (phantomless, as in opportunistic QCT): the patient's own subcutaneous fat and gluteal
  and iliopsoas muscle, whose CT numbers on a reference scanner are known (config
  ``calibration.internal_fat_hu``, ``internal_muscle_hu``), fix the scanner's HU scale; the HA slope of
  the reference scanner (``reference_ha_hu_per_mg_cm3``) then gives the line.

The QCT vBMD of each proximal femur (mean HA-equivalent density over the region, unclipped, as QCT
reports it) is written to ``calibration.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonedrr.errors import InputError
from bonedrr.images import atomic_path, image_like, world_axis_grid, write_image, write_json
from bonedrr.labels import BONE_LABELS, CANONICAL_LABELS, SIDES, proximal_femur_mask

MUSCLES = ("gluteus_maximus", "gluteus_medius", "gluteus_minimus", "iliopsoas")
DEFAULTS = {"reference_ha_hu_per_mg_cm3": 1.15, "internal_fat_hu": -100.0, "internal_muscle_hu": 45.0,
            "phantom_background_mg_cm3": 0.0, "phantom_min_r2": 0.995}


@dataclass
class Calibration:
    """A CT's calibration line, ``HU = intercept + slope * (mg/cm3 HA)``.

    Args:
        method: ``phantom``, ``scanner`` or ``internal``.
        slope: HU per mg/cm3 hydroxyapatite.
        intercept: HU of zero mineral (water-equivalent tissue).
        reference_ha_hu_per_mg_cm3: The reference scanner's HA slope (scales soft tissue to true HU).
        details: What the method measured (rods and residuals, tissue medians, scanner name).
    """

    method: str
    slope: float
    intercept: float
    reference_ha_hu_per_mg_cm3: float = DEFAULTS["reference_ha_hu_per_mg_cm3"]
    details: dict = field(default_factory=dict)

    def mineral(self, hu: np.ndarray) -> np.ndarray:
        """HA-equivalent density, mg/cm3 (unclipped, the QCT convention)."""
        return (hu - self.intercept) / self.slope

    def mass_density(self, hu: np.ndarray) -> np.ndarray:
        """Mass density of non-bone tissue, mg/cm3."""
        true_hu = (hu - self.intercept) * self.reference_ha_hu_per_mg_cm3 / self.slope
        return np.clip(1000.0 + true_hu, 0.0, None)


# ---------------------------------------------------------------------------------------------
# The three methods


def scanner_calibration(scanner: str | None, scanners: dict, reference: float, path=None) -> Calibration:
    """Documented per-scanner coefficients."""
    if not scanner:
        raise InputError("calibration method 'scanner' needs the sample sheet's scanner column", path)
    if scanner not in scanners:
        raise InputError(f"scanner {scanner!r} has no coefficients in calibration.scanners", path)
    c = scanners[scanner]
    return Calibration("scanner", float(c["slope"]), float(c["intercept"]), reference, {"scanner": scanner})


def internal_calibration(hu: np.ndarray, labels: np.ndarray, fat_hu: float, muscle_hu: float,
                         reference: float, path=None) -> Calibration:
    """Phantomless calibration from the patient's fat and muscle.

    Muscle: the gluteal and iliopsoas labels, eroded by one voxel, HU within -100..200: their median.
    Fat: unlabelled body voxels with HU within -250..-30: the peak of their histogram (pure adipose
    tissue; a median would be pulled up by fat mixed with other tissue).
    These fix the scanner's scale ``HU = a * true HU + b``; then slope = a * reference.
    """
    muscle_ids = [CANONICAL_LABELS[f"{m}_{s}"] for m in MUSCLES for s in SIDES]
    muscle = ndimage.binary_erosion(np.isin(labels, muscle_ids)) & (hu > -100) & (hu < 200)
    fat = (labels == 0) & (hu > -250) & (hu < -30)
    if muscle.sum() < 100 or fat.sum() < 100:
        raise InputError(f"internal calibration needs muscle and fat: found {int(muscle.sum())} muscle and "
                         f"{int(fat.sum())} fat voxels", path)
    m_muscle, m_fat = float(np.median(hu[muscle])), _histogram_peak(hu[fat])
    a = (m_muscle - m_fat) / (muscle_hu - fat_hu)
    if not 0.5 < a < 2.0:
        raise InputError(f"internal calibration failed: muscle {m_muscle:.0f} HU and fat {m_fat:.0f} HU give a "
                         f"scale of {a:.2f}", path)
    b = m_fat - a * fat_hu
    return Calibration("internal", a * reference, b, reference, {
        "muscle_median_hu": m_muscle, "fat_peak_hu": m_fat, "muscle_voxels": int(muscle.sum()),
        "fat_voxels": int(fat.sum()), "reference_fat_hu": fat_hu, "reference_muscle_hu": muscle_hu,
        "hu_scale": a})


def _histogram_peak(values: np.ndarray, bin_hu: float = 2.0, smooth_hu: float = 6.0) -> float:
    counts, edges = np.histogram(values, bins=np.arange(values.min(), values.max() + bin_hu, bin_hu))
    counts = ndimage.gaussian_filter1d(counts.astype(float), smooth_hu / bin_hu)
    i = int(np.argmax(counts))
    return float((edges[i] + edges[i + 1]) / 2)


def phantom_calibration(hu: np.ndarray, rods_mg_cm3, background_mg_cm3: float, reference: float,
                        min_r2: float = DEFAULTS["phantom_min_r2"], path=None) -> Calibration:
    """Find a calibration phantom's rods in the scan and fit HU against their densities.

    The phantom is the largest body of matter apart from the patient (3D connected components of
    HU > -500). Its rods run along the scan axis: in the phantom's mean axial image, they are the
    blobs that differ from the surrounding resin. Rods as dense as the resin cannot be seen and are
    left out; the others are matched to the known densities in order of their CT numbers.

    Raises:
        InputError: No phantom, a different number of rods than expected, or a poor fit.
    """
    rods = np.sort(np.asarray(rods_mg_cm3, float))
    visible = rods[np.abs(rods - background_mg_cm3) > 1.0]
    matter, n = ndimage.label(hu > -500)
    if n < 2:
        raise InputError("no calibration phantom found (nothing in the scan apart from the patient)", path)
    sizes = ndimage.sum_labels(np.ones_like(hu, bool), matter, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1] + 1
    phantom = matter == order[1]
    if sizes[order[1] - 1] < 0.002 * hu.size:
        raise InputError("no calibration phantom found (no second body of matter of phantom size)", path)
    slices = phantom.any(axis=(1, 2))
    ks = np.nonzero(slices)[0]
    inner = ks[2:-2] if len(ks) > 8 else ks  # the phantom's ends are partial-volume slices
    footprint = phantom[inner].mean(axis=0) > 0.99
    mean_image = np.where(phantom[inner], hu[inner], 0).sum(0) / np.maximum(phantom[inner].sum(0), 1)
    core = ndimage.binary_erosion(footprint, iterations=1)
    if core.sum() < 10:
        raise InputError("no calibration phantom found (the largest object apart from the patient does not "
                         "run the length of the scan)", path)
    background = float(np.median(mean_image[core]))
    noise = 1.4826 * float(np.median(np.abs(mean_image[core] - background)))
    blobs, n_blobs = ndimage.label(core & (np.abs(mean_image - background) > max(6 * noise, 20.0)))
    areas = ndimage.sum_labels(np.ones_like(blobs), blobs, index=np.arange(1, n_blobs + 1))
    candidates = [i + 1 for i, a in enumerate(areas) if a >= 4]
    if not candidates:
        raise InputError("no calibration phantom found (the largest object apart from the patient, a table "
                         "perhaps, holds no rods)", path)
    if len(candidates) != len(visible):
        raise InputError(f"calibration phantom: found {len(candidates)} rods differing from the resin, expected "
                         f"{len(visible)} (rods {rods.tolist()} mg/cm3, resin {background_mg_cm3} mg/cm3)", path)
    measured = []
    for blob in candidates:
        roi2d = ndimage.binary_erosion(blobs == blob, iterations=1)
        if roi2d.sum() < 2:
            roi2d = blobs == blob
        values = hu[inner][:, roi2d]
        centre = np.argwhere(roi2d).mean(0)
        measured.append({"mean_hu": float(values.mean()), "sd_hu": float(values.std()),
                         "voxels": int(values.size), "centre_ji": centre.round(2).tolist()})
    measured.sort(key=lambda r: r["mean_hu"])
    for rod, density in zip(measured, visible):
        rod["mg_cm3"] = float(density)
    x = np.array([r["mg_cm3"] for r in measured] + [background_mg_cm3])
    y = np.array([r["mean_hu"] for r in measured] + [background])
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    r2 = 1 - residuals.var() / y.var()
    for rod, res in zip(measured, residuals):
        rod["residual_hu"] = float(res)
    details = {"rods": measured, "resin": {"mg_cm3": background_mg_cm3, "median_hu": background,
                                           "residual_hu": float(residuals[-1])},
               "r2": float(r2), "rms_residual_hu": float(np.sqrt(np.mean(residuals ** 2))),
               "slices": [int(inner[0]), int(inner[-1])]}
    if r2 < min_r2 or slope <= 0:
        raise InputError(f"calibration phantom fit is poor (r2 {r2:.4f} < {min_r2}); check calibration."
                         "phantom_rods_mg_cm3", path)
    return Calibration("phantom", float(slope), float(intercept), reference, details)


# ---------------------------------------------------------------------------------------------
# The stage


def density_volume(hu: np.ndarray, labels: np.ndarray, calibration: Calibration) -> np.ndarray:
    """mg/cm3: HA-equivalent mineral (>= 0) in bone voxels, mass density elsewhere."""
    bone = np.isin(labels, [CANONICAL_LABELS[n] for n in BONE_LABELS])
    return np.where(bone, np.clip(calibration.mineral(hu), 0.0, None),
                    calibration.mass_density(hu)).astype(np.float32)


def calibrate(hu: np.ndarray, labels: np.ndarray, settings: dict, scanner: str | None = None,
              path=None) -> Calibration:
    """Calibrate one CT with the method and settings of its cohort (config ``calibration``)."""
    s = {**DEFAULTS, **settings}
    reference = float(s["reference_ha_hu_per_mg_cm3"])
    method = s["method"]
    if method == "phantom":
        if "phantom_rods_mg_cm3" not in s:
            raise InputError("calibration method 'phantom' needs calibration.phantom_rods_mg_cm3", path)
        return phantom_calibration(hu, s["phantom_rods_mg_cm3"], float(s["phantom_background_mg_cm3"]), reference,
                                   float(s["phantom_min_r2"]), path)
    if method == "scanner":
        return scanner_calibration(scanner, s.get("scanners", {}), reference, path)
    if method == "internal":
        return internal_calibration(hu, labels, float(s["internal_fat_hu"]), float(s["internal_muscle_hu"]),
                                    reference, path)
    raise ValueError(f"unknown calibration method {method!r}")


def calibrate_case(ct_path: str | Path, labels_path: str | Path, out_dir: str | Path, settings: dict,
                   scanner: str | None = None, cut_mm: float = 80.0) -> dict:
    """Write density.nii.gz, calibration.json and calibration.png for one case. Returns the JSON."""
    out_dir = Path(out_dir)
    ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    labels_image = sitk.ReadImage(str(labels_path))
    if labels_image.GetSize() != ct.GetSize():
        raise InputError(f"label grid {labels_image.GetSize()} differs from the CT's {ct.GetSize()}", labels_path)
    hu = sitk.GetArrayFromImage(ct)
    labels = sitk.GetArrayFromImage(labels_image)
    cal = calibrate(hu, labels, settings, scanner, ct_path)
    z = world_axis_grid(ct, 2)
    vbmd = {}
    for side in SIDES:
        region = proximal_femur_mask(labels, side, z, cut_mm)
        vbmd[side] = float(cal.mineral(hu[region]).mean()) if region.any() else None
    record = {"method": cal.method, "slope_hu_per_mg_cm3": cal.slope, "intercept_hu": cal.intercept,
              "reference_ha_hu_per_mg_cm3": cal.reference_ha_hu_per_mg_cm3, "details": cal.details,
              "qct_vbmd_mg_cm3": vbmd, "proximal_femur_cut_mm": cut_mm,
              "density_units": "mg/cm3: HA-equivalent mineral in bone voxels, mass density elsewhere"}
    write_image(image_like(density_volume(hu, labels, cal), ct), out_dir / "density.nii.gz")
    _plot(out_dir / "calibration.png", hu, cal)
    write_json(out_dir / "calibration.json", record)
    return record


def _plot(path: Path, hu: np.ndarray, cal: Calibration) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    k = hu.shape[0] // 2
    axes[0].imshow(hu[k], cmap="gray", vmin=-200, vmax=1000)
    axes[0].set_title(f"axial slice {k}")
    axes[0].axis("off")
    ax = axes[1]
    if cal.method == "phantom":
        rods = cal.details["rods"]
        for r in rods:
            axes[0].add_patch(plt.Circle(r["centre_ji"][::-1], 4, fill=False, color="tab:orange"))
        x = [r["mg_cm3"] for r in rods] + [cal.details["resin"]["mg_cm3"]]
        y = [r["mean_hu"] for r in rods] + [cal.details["resin"]["median_hu"]]
        ax.plot(x, y, "o", label="rods and resin")
        ax.set_title(f"phantom fit, r2 {cal.details['r2']:.5f}, rms {cal.details['rms_residual_hu']:.1f} HU")
    elif cal.method == "internal":
        x = [cal.details["reference_fat_hu"] / cal.reference_ha_hu_per_mg_cm3,
             cal.details["reference_muscle_hu"] / cal.reference_ha_hu_per_mg_cm3]
        y = [cal.details["fat_peak_hu"], cal.details["muscle_median_hu"]]
        ax.plot(x, y, "o", label="fat, muscle")
        ax.set_title("internal (phantomless) calibration")
    else:
        x = [0.0, 0.0]
        ax.set_title(f"scanner {cal.details.get('scanner')}")
    grid = np.linspace(min(min(x), 0.0), max(max(x), 800.0), 50)
    ax.plot(grid, cal.intercept + cal.slope * grid, "-",
            label=f"HU = {cal.intercept:.1f} + {cal.slope:.4f} x mg/cm3")
    ax.set_xlabel("mg/cm3 hydroxyapatite")
    ax.set_ylabel("HU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
