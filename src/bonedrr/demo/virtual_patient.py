"""Virtual patients: the template CT decomposed into materials, and how each patient differs.

Material model (the demo's ground truth; the pipeline never sees it):

* ``mineral``: bone mineral, mg/cm3 hydroxyapatite (HA), only inside bone labels;
* ``soft_hu``: the CT number of everything else in the voxel (marrow, muscle, fat, air).

A voxel's true CT number is ``soft_hu + HA_HU_PER_MG * mineral`` (the scanner-independent relation
of an ideal 120 kVp scanner with water at 0 HU); a bone voxel's mineral is what its CT number has
above the marrow baseline of 0 HU. For the radiograph, ``soft_hu`` is split into water-like tissue
and fat (linear between fat at -100 HU and muscle at +50 HU) with mass density ``1 + HU/1000``.

A patient differs from the template in bone mineral (a global factor chosen to hit a drawn DXA
total-hip aBMD, times a factor per bone region, trabecular bone changing more than cortical), body
size (an isotropic scale), a smooth random deformation, an added subcutaneous layer (thickness and fat
fraction), the CT scanner's calibration (HU slope and offset, with a calibration phantom scanned under
the patient), and the pose of the radiograph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonedrr.demo.naming import DEFAULTS
from bonedrr.errors import InputError
from bonedrr.images import read_volume, world_axis_grid
from bonedrr.labels import BONE_LABELS, CANONICAL_LABELS, LABEL_NAMES, PRESETS, proximal_femur_mask, remap

HA_HU_PER_MG = 1.15  # HU per mg/cm3 HA, ideal scanner
FAT_HU, MUSCLE_HU = -100.0, 50.0
METAL_HU = 2200.0  # above any bone at 3 mm voxels; the template's screw is above it
PHANTOM_RODS_MG_CM3 = DEFAULTS["phantom_rods_mg_cm3"]
PHANTOM_ROD_DIAMETER_MM = 18.0
POSTERIOR_PAD_MM = 75.0  # room under the patient for the calibration phantom
#: The template scan ends at the greater trochanters, 57 mm below the femoral heads' top. It is
#: extended below (thighs and a stand-in for the femoral shafts, see :func:`_extend_below`), so that
#: a radiograph centred on the hips holds the whole proximal femur (80 mm) and never shows where the
#: scan ends. Virtual patients' labels and truth include the extension.
INFERIOR_EXTENSION_MM = 100.0

#: Virtual scanners: scanner HU = intercept + slope * true HU. Their nominal QCT lines
#: (HU = intercept + slope * HA_HU_PER_MG * mg/cm3) are documented in the demo config as per-scanner
#: coefficients; each scan drifts a little from them, which only the phantom sees.
SCANNERS = {
    "demo_scanner_a": {"slope": 0.97, "intercept": -12.0},
    "demo_scanner_b": {"slope": 1.04, "intercept": 18.0},
    "demo_scanner_c": {"slope": 1.10, "intercept": 35.0},
}


def default_template_dir() -> Path:
    """The vendored template (``resources/totalseg_example`` of the repository)."""
    return Path(__file__).resolve().parents[3] / "resources" / "totalseg_example"


@dataclass
class Materials:
    """A body on a grid: bone mineral (mg/cm3 HA), the rest's CT number, canonical labels."""

    mineral: np.ndarray
    soft_hu: np.ndarray
    labels: np.ndarray
    grid: sitk.Image

    def true_hu(self) -> np.ndarray:
        return self.soft_hu + HA_HU_PER_MG * self.mineral

    def densities(self) -> dict[str, np.ndarray]:
        """g/cm3 of mineral, water-like tissue and fat, as the radiograph simulator wants them."""
        mass = np.clip(1.0 + self.soft_hu / 1000.0, 0.0, None)
        fat_fraction = np.clip((MUSCLE_HU - self.soft_hu) / (MUSCLE_HU - FAT_HU), 0.0, 1.0)
        return {"mineral": self.mineral / 1000.0, "water": mass * (1 - fat_fraction),
                "fat": mass * fat_fraction}


def load_template(folder: str | Path | None = None) -> Materials:
    """Read the template CT and its TotalSegmentator labels; inpaint metal; decompose into materials.

    The volume is reoriented to an identity direction (LPS) and padded posteriorly to leave room for
    the calibration phantom.
    """
    folder = Path(folder) if folder else default_template_dir()
    if not (folder / "ct.nii.gz").is_file() or not (folder / "labels.nii.gz").is_file():
        raise InputError("template folder lacks ct.nii.gz and labels.nii.gz", folder)
    ct = sitk.DICOMOrient(sitk.Cast(read_volume(folder / "ct.nii.gz"), sitk.sitkFloat32), "LPS")
    seg = sitk.DICOMOrient(read_volume(folder / "labels.nii.gz"), "LPS")
    pad = int(np.ceil(POSTERIOR_PAD_MM / ct.GetSpacing()[1]))
    ct = sitk.ConstantPad(ct, (0, 0, 0), (0, pad, 0), -1024.0)
    seg = sitk.ConstantPad(seg, (0, 0, 0), (0, pad, 0), 0)
    hu = _inpaint_metal(sitk.GetArrayFromImage(ct).astype(np.float32),
                        remap(sitk.GetArrayFromImage(seg), PRESETS["totalsegmentator_v2"]))
    hu, labels, grid = _extend_below(hu, remap(sitk.GetArrayFromImage(seg), PRESETS["totalsegmentator_v2"]), ct,
                                     INFERIOR_EXTENSION_MM)
    bone = np.isin(labels, [CANONICAL_LABELS[n] for n in BONE_LABELS])
    mineral = np.where(bone, np.clip(hu, 0, None) / HA_HU_PER_MG, 0).astype(np.float32)
    return Materials(mineral, (hu - HA_HU_PER_MG * mineral).astype(np.float32), labels, grid)


SHAFT_CORTEX_HU, MARROW_HU, SHAFT_RADIUS_MM = 1300.0, 60.0, 14.0


def _extend_below(hu: np.ndarray, labels: np.ndarray, grid: sitk.Image, length_mm: float):
    """Continue the body ``length_mm`` below the scan's last slice: soft tissue and muscles as in that
    slice; the pelvic bones end; each femur narrows within 30 mm from its last cross-section to a
    shaft (a disc of SHAFT_RADIUS_MM about that cross-section's centre: a cortical ring around
    marrow). Returns (hu, labels, grid)."""
    n = int(round(length_mm / grid.GetSpacing()[2]))
    if n == 0:
        return hu, labels, grid
    sx, sy, sz = grid.GetSpacing()
    base_hu, base_labels = hu[0].copy(), labels[0].copy()
    femurs = [CANONICAL_LABELS["femur_left"], CANONICAL_LABELS["femur_right"]]
    ends = np.isin(base_labels, [CANONICAL_LABELS[b] for b in BONE_LABELS]) & ~np.isin(base_labels, femurs)
    base_hu[ends], base_labels[ends] = MUSCLE_HU, 0
    ext_hu = np.repeat(base_hu[None], n, axis=0)
    ext_labels = np.repeat(base_labels[None], n, axis=0)
    yy, xx = np.meshgrid(np.arange(hu.shape[1]) * sy, np.arange(hu.shape[2]) * sx, indexing="ij")
    for femur in femurs:
        base = base_labels == femur
        if not base.any():
            continue
        cy, cx = np.argwhere(base).mean(0) * (sy, sx)
        distance = np.hypot(yy - cy, xx - cx)
        widest = float(distance[base].max())
        for e in range(n):  # e = 0 is the slice just below the scan
            blend = min((e + 1) * sz / 30.0, 1.0)
            shaft = base & (distance <= widest + blend * (SHAFT_RADIUS_MM - widest))
            ring = shaft & ~ndimage.binary_erosion(shaft)
            inner = shaft & ~ring
            gone = base & ~shaft
            ext_hu[e][gone], ext_labels[e][gone] = MUSCLE_HU, 0
            ext_hu[e][ring] = (1 - blend) * base_hu[ring] + blend * SHAFT_CORTEX_HU
            ext_hu[e][inner] = (1 - blend) * base_hu[inner] + blend * MARROW_HU
    extended = sitk.GetImageFromArray(np.concatenate([ext_hu[::-1], hu]))
    extended.SetSpacing(grid.GetSpacing())
    extended.SetDirection(grid.GetDirection())
    extended.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, -float(n))))
    return (sitk.GetArrayFromImage(extended).astype(np.float32),
            np.concatenate([ext_labels[::-1], labels]).astype(np.uint8), extended)


def _inpaint_metal(hu: np.ndarray, labels: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Replace metal (and a one-voxel rim) smoothly from the surrounding tissue of the same label.

    The gap starts at the median CT number of the same structure on the other side (the template's
    screw sits in the left femur) and is then relaxed by repeated local averaging over that label
    only (a discrete harmonic fill), so it blends into the neighbouring bone or soft tissue."""
    metal = ndimage.binary_dilation(hu > METAL_HU, iterations=1)
    if not metal.any():
        return hu
    box = tuple(slice(max(int(lo) - 3, 0), int(hi) + 4) for lo, hi in zip(*[np.argwhere(metal).min(0),
                                                                           np.argwhere(metal).max(0)]))
    out = hu.copy()
    sub_hu, sub_metal, sub_labels = out[box], metal[box], labels[box]
    for lab in np.unique(sub_labels[sub_metal]):
        name = LABEL_NAMES.get(int(lab), "")
        twin = name.replace("_left", "_right") if name.endswith("_left") else name.replace("_right", "_left")
        source = labels == CANONICAL_LABELS.get(twin, int(lab))
        if not (source & ~metal).any():
            source = labels == lab
        region = sub_labels == lab
        gap = sub_metal & region
        sub_hu[gap] = np.median(hu[source & ~metal])
        weight = ndimage.uniform_filter(region.astype(np.float32), 3)
        for _ in range(iterations):
            mean = ndimage.uniform_filter(np.where(region, sub_hu, 0.0), 3) / np.maximum(weight, 1e-6)
            sub_hu[gap] = mean[gap]
    return out


@dataclass
class PatientParams:
    """Every random draw that makes one virtual patient (recorded in truth.json)."""

    target_dxa_abmd: float
    bone_factor: float
    region_factors: dict[str, float]
    body_scale: float
    deformation_mm: float
    layer_mm: float
    layer_fat_fraction: float
    scanner: str
    scanner_slope: float
    scanner_intercept: float
    ct_noise_hu: float
    pose_rotvec_deg: list[float] = field(default_factory=list)
    pose_shift_mm: list[float] = field(default_factory=list)
    deformation_seed: int = 0
    side_dxa_abmd: dict[str, float] = field(default_factory=dict)
    proximal_femur_cut_mm: float = 80.0

    def to_dict(self) -> dict:
        return asdict(self)


def draw_params(rng: np.random.Generator, template_abmd: dict[str, float], abmd_range=(0.45, 1.15),
                deformation_mm: float = 4.0, trabecular_share: float = 0.9,
                proximal_femur_cut_mm: float = 80.0) -> PatientParams:
    """Draw one patient.

    Args:
        rng: The case's random generator.
        template_abmd: The template's aBMD per side at factor 1 (see :func:`dxa_abmd`). Each femur's
            factor is corrected by the template's own left/right difference, so that both hips of a
            patient are drawn around the same target.
        abmd_range: Range of the target DXA total-hip aBMD, g/cm2.
        deformation_mm: RMS of the smooth random displacement.
        trabecular_share: The template's :func:`trabecular_share`.
        proximal_femur_cut_mm: The DXA region (see ``labels.proximal_femur_mask``).
    """
    target = float(rng.uniform(*abmd_range))
    body_scale = float(rng.uniform(0.93, 1.07))
    scanner = str(rng.choice(sorted(SCANNERS)))
    nominal = SCANNERS[scanner]
    regions = {n: float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12)) for n in BONE_LABELS}
    mean_abmd = float(np.mean(list(template_abmd.values())))
    for side, value in template_abmd.items():
        regions[f"femur_{side}"] *= _factor_for(mean_abmd, value, trabecular_share)
    return PatientParams(
        target_dxa_abmd=target,
        bone_factor=_factor_for(target / body_scale, mean_abmd, trabecular_share),
        region_factors=regions,
        body_scale=body_scale,
        deformation_mm=float(deformation_mm),
        layer_mm=float(rng.uniform(0.0, 24.0)),
        layer_fat_fraction=float(rng.uniform(0.85, 1.0)),
        scanner=scanner,
        scanner_slope=float(nominal["slope"] * rng.normal(1.0, 0.005)),
        scanner_intercept=float(nominal["intercept"] + rng.normal(0.0, 2.0)),
        ct_noise_hu=float(rng.uniform(6.0, 15.0)),
        pose_rotvec_deg=[float(v) for v in rng.uniform(-4, 4, 3)],
        pose_shift_mm=[float(v) for v in rng.uniform(-8, 8, 3)],
        deformation_seed=int(rng.integers(2**31)),
        side_dxa_abmd={s: target * float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1)) for s in template_abmd},
        proximal_femur_cut_mm=float(proximal_femur_cut_mm),
    )


def _factor_for(target_abmd: float, template_abmd: float, share: float) -> float:
    """Global mineral factor giving ``target_abmd``, inverting the linear model of :func:`_mineral_factor`:
    aBMD(f) = template * (share * f + (1 - share) * (0.4 + 0.6 f))."""
    return float(np.clip((target_abmd / template_abmd - (1 - share) * 0.4) / (share + (1 - share) * 0.6),
                         0.15, 2.5))


def trabecular_share(template: Materials, cut_mm: float) -> float:
    """Share of the proximal femurs' mineral that :func:`_mineral_factor` treats as trabecular."""
    z = world_axis_grid(template.grid, 2)
    region = proximal_femur_mask(template.labels, "left", z, cut_mm) | proximal_femur_mask(
        template.labels, "right", z, cut_mm)
    m = template.mineral[region]
    return float(((1 - _cortical_weight(m)) * m).sum() / max(m.sum(), 1e-9))


def _cortical_weight(mineral: np.ndarray) -> np.ndarray:
    return np.clip((mineral - 300.0) / 400.0, 0.0, 1.0)


def _mineral_factor(mineral: np.ndarray, factor: float) -> np.ndarray:
    """Trabecular bone (low mineral) takes the whole factor, cortical bone 60 % of its change."""
    cortical = _cortical_weight(mineral)
    return (1 - cortical) * factor + cortical * (1 + 0.6 * (factor - 1))


def make_patient(template: Materials, params: PatientParams) -> Materials:
    """The virtual patient's body on the template's grid.

    Bone mineral is first scaled by the patient's factors (trabecular more than cortical), then each
    femur by the one factor that makes its simulated DXA aBMD equal ``params.side_dxa_abmd`` (the
    deformation and body size would otherwise shift it)."""
    mineral = template.mineral.copy()
    for name in BONE_LABELS:
        region = template.labels == CANONICAL_LABELS[name]
        mineral[region] *= _mineral_factor(mineral[region], params.bone_factor * params.region_factors[name])
    coords = _warp_coordinates(template, params)
    warped_mineral = ndimage.map_coordinates(mineral, coords, order=1, mode="nearest")
    # "nearest": a body shrunk by body_scale repeats the scan's edge slices rather than showing air.
    soft = ndimage.map_coordinates(template.soft_hu, coords, order=1, mode="nearest")
    labels = ndimage.map_coordinates(template.labels, coords, order=0, mode="nearest")
    shape = template.labels.shape
    body = _add_layer(soft.reshape(shape), template.grid, params.layer_mm, params.layer_fat_fraction)
    patient = Materials(warped_mineral.reshape(shape).astype(np.float32), body,
                        labels.reshape(shape).astype(np.uint8), template.grid)
    for side, target in params.side_dxa_abmd.items():
        actual = dxa_abmd(patient, side, params.proximal_femur_cut_mm)
        if np.isfinite(actual) and actual > 0:
            patient.mineral[patient.labels == CANONICAL_LABELS[f"femur_{side}"]] *= target / actual
    return patient


def _warp_coordinates(template: Materials, params: PatientParams) -> np.ndarray:
    """Template index coordinates sampled by each output voxel: a scaling about the body centre plus
    a smooth random displacement (per axis, a sum of six plane waves of 150-400 mm wavelength whose
    RMS is ``deformation_mm``)."""
    shape = template.labels.shape
    spacing = np.asarray(template.grid.GetSpacing())[::-1]  # (k, j, i) order
    rng = np.random.default_rng(params.deformation_seed)
    body_voxels = np.argwhere(template.soft_hu > -500)
    centre = body_voxels.mean(0) if len(body_voxels) else (np.asarray(shape) - 1) / 2
    grid_mm = [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) * spacing[i]
               for i, n in enumerate(shape)]
    coords = np.empty((3, *shape), np.float32)
    for axis in range(3):
        displacement = np.zeros(shape, np.float32)
        for _ in range(6):
            direction = rng.normal(size=3)
            k = direction / np.linalg.norm(direction) * 2 * np.pi / rng.uniform(150, 400)
            phase = sum(k[a] * grid_mm[a] for a in range(3)) + rng.uniform(0, 2 * np.pi)
            displacement += np.sin(phase).astype(np.float32)
        displacement *= params.deformation_mm / np.sqrt(3.0) / spacing[axis]  # RMS of 6 unit sines = sqrt(3)
        index = np.arange(shape[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        coords[axis] = centre[axis] + (index - centre[axis]) / params.body_scale + displacement
    return coords.reshape(3, -1)


def _add_layer(soft_hu: np.ndarray, grid: sitk.Image, layer_mm: float, fat_fraction: float) -> np.ndarray:
    """Grow a subcutaneous layer of ``layer_mm`` around the body, in each axial slice."""
    if layer_mm <= 0:
        return soft_hu.astype(np.float32)
    body = soft_hu > -500
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    sx, sy, _ = grid.GetSpacing()
    distance = np.stack([ndimage.distance_transform_edt(~s, sampling=(sy, sx)) for s in body])
    layer = (distance > 0) & (distance <= layer_mm)
    out = soft_hu.copy()
    out[layer] = fat_fraction * FAT_HU + (1 - fat_fraction) * MUSCLE_HU
    return out.astype(np.float32)


def scanned_hu(patient: Materials, params: PatientParams, rng: np.random.Generator) -> np.ndarray:
    """The CT the virtual scanner writes: the patient plus the calibration phantom under it, through the
    scanner's HU calibration, with noise."""
    hu = patient.true_hu()
    hu = np.where(_phantom_block(patient), _phantom_hu(patient), hu)
    hu = params.scanner_slope * hu + params.scanner_intercept
    return (hu + rng.normal(0.0, params.ct_noise_hu, hu.shape)).astype(np.float32)


def phantom_rod_masks(patient: Materials) -> list[np.ndarray]:
    """One mask per phantom rod (in :data:`PHANTOM_RODS_MG_CM3` order), on the patient's grid."""
    nz, ny, nx = patient.labels.shape
    sx, sy, _ = patient.grid.GetSpacing()
    y0, x_centres = _phantom_layout(patient)
    yy, xx = np.meshgrid(np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    y_mid = (y0 + 15.0)
    masks = []
    for xc in x_centres:
        disc = (yy - y_mid) ** 2 + (xx - xc) ** 2 <= (PHANTOM_ROD_DIAMETER_MM / 2) ** 2
        masks.append(np.broadcast_to(disc, (nz, ny, nx)))
    return masks


def _phantom_layout(patient: Materials) -> tuple[float, list[float]]:
    """Top of the 30 mm phantom block (mm from the grid's first row) and rod centres (mm in x)."""
    sx, sy, _ = patient.grid.GetSpacing()
    nx = patient.labels.shape[2]
    body_rows = np.nonzero((patient.soft_hu > -500).any(axis=(0, 2)))[0]
    y0 = (body_rows.max() + 2) * sy
    centre_x = (nx - 1) * sx / 2
    n = len(PHANTOM_RODS_MG_CM3)
    return y0, [centre_x + (i - (n - 1) / 2) * 40.0 for i in range(n)]


def _phantom_block(patient: Materials) -> np.ndarray:
    nz, ny, nx = patient.labels.shape
    sx, sy, _ = patient.grid.GetSpacing()
    y0, x_centres = _phantom_layout(patient)
    y = np.arange(ny) * sy
    x = np.arange(nx) * sx
    in_y = (y >= y0) & (y <= y0 + 30.0)
    in_x = (x >= x_centres[0] - 25.0) & (x <= x_centres[-1] + 25.0)
    return np.broadcast_to(in_y[None, :, None] & in_x[None, None, :], (nz, ny, nx))


def _phantom_hu(patient: Materials) -> np.ndarray:
    hu = np.zeros(patient.labels.shape, np.float32)  # water-equivalent resin
    for rho, mask in zip(PHANTOM_RODS_MG_CM3, phantom_rod_masks(patient)):
        hu[mask] = HA_HU_PER_MG * rho
    return hu


# ---------------------------------------------------------------------------------------------
# Ground truth


def qct_vbmd(patient: Materials, side: str, cut_mm: float) -> float:
    """Volumetric BMD of the proximal femur (mg/cm3 HA) as an ideal QCT reports it: the mean
    HA-equivalent density, true HU / HA_HU_PER_MG, over the region."""
    region = proximal_femur_mask(patient.labels, side, world_axis_grid(patient.grid, 2), cut_mm)
    return float((patient.true_hu()[region] / HA_HU_PER_MG).mean()) if region.any() else float("nan")


def dxa_abmd(patient: Materials, side: str, cut_mm: float) -> float:
    """Simulated DXA total-hip aBMD (g/cm2): the proximal femur's mineral projected AP (parallel
    beam), divided by its projected area."""
    region = proximal_femur_mask(patient.labels, side, world_axis_grid(patient.grid, 2), cut_mm)
    if not region.any():
        return float("nan")
    sx, sy, sz = patient.grid.GetSpacing()
    bmc = (patient.mineral * region).sum(axis=1) * sy / 10.0 / 1000.0  # g/cm2 per (z, x) pixel
    area = region.any(axis=1)
    return float(bmc[area].mean())


def bone_mineral_mass_g(patient: Materials) -> float:
    """Total bone mineral in the body, grams (for mass-conservation checks downstream)."""
    sx, sy, sz = patient.grid.GetSpacing()
    return float(patient.mineral.sum() * sx * sy * sz / 1000.0 / 1000.0)
