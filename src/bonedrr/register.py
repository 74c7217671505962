"""The ``register`` stage: the pose of a CT in its radiograph's camera, by 2D/3D registration.

Intensity-based, as the published pipeline: the radiograph is compared with DRRs of the CT's bones
(the calibrated density inside the bone labels: soft tissue, tables and calibration phantoms are not in
a radiograph the way they are in a CT) by gradient correlation (GC: the mean of the normalised
cross-correlations of the two images' Sobel derivatives, insensitive to the radiograph's unknown
exposure, windowing and tone curve). The pose is searched with CMA-ES (``cmaes``) over 6 degrees of
freedom (rotation about the bones' centre, translation in camera axes), coarse to fine: each level's
detector is binned by a factor, the coarsest first. The coarse levels integrate the rays with Siddon's
exact path lengths (nearest voxel: the fastest); the finest level with ``fine_method`` (trilinear by
default). With CT voxels (often 2-3 mm) larger than the radiograph's pixels, a nearest-voxel DRR
moves in steps as the pose moves by less than a voxel, and GC's optimum lands anywhere on a flat,
stepped plateau: on the demo, from the true pose, Siddon's optimum was 0.17-0.36 mm (mPD) away
depending on the optimiser's seed, the trilinear one 0.14-0.21 mm, the same for both seeds.

Automatic initial pose for a standard AP hip/pelvis radiograph: the bones' centre on the central ray at
the source-to-patient distance of the DICOM tags (else the cohort's prior), patient supine (AP), then an
exhaustive search of the in-plane shift (up to ``init_shift_mm``) at the coarsest level.

The finest level is optimised ``restarts`` times (CMA-ES with different seeds, from the same start);
the best is kept, and the spread of the others around it (their mPD from it, mm at the isocentre) is
a measure of how well the similarity pins the pose down.

QA flags (``pose.json``): ``low_similarity`` (the final pose's GC, judged at ``qa_pixel_mm``, below
``min_gc``), ``at_search_bound`` (the solution touches a level's search box), ``not_converged`` (the
last level's step size did not shrink), ``unstable`` (the restarts of the finest level disagree by more
than ``max_restart_spread_mm``). ``converged`` is true when no flag is raised.

Per-structure registration (``per_structure``): the pelvis and each femur are rigid bodies of their own
(:data:`RIGID_BODIES`). After the whole-bone registration, the pelvis is refined with the femurs held
where they are, then each femur from the pelvis pose, rotating about its head, with everything else
held; each body's similarity is the GC of the radiograph and the DRR of all bones (each at its pose)
over the detector region where that body projects (a femur: its proximal 80 mm). A femur turns in
its hip joint: its pose is the pelvis pose rotated about the femoral head (3 parameters; translation
along the joint is below what an AP view resolves). ``world_to_camera`` is then the pelvis pose; each
body's pose and QA are in ``structures``. The ``drr`` stage renders the femurs at their own poses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bonedrr.errors import InputError
from bonedrr.geometry import Geometry, ap_pose, apply, rigid, translation
from bonedrr.images import atomic_path, index_to_world, write_json
from bonedrr.labels import BONE_LABELS, CANONICAL_LABELS
from bonedrr.render import Renderer

log = logging.getLogger(__name__)

#: Rigid bodies of per-structure registration, in the order they are registered (the sacrum and spine,
#: ``other_bone``, move with the pelvis).
RIGID_BODIES: dict[str, tuple[str, ...]] = {"pelvis": ("hip_left", "hip_right", "other_bone"),
                                             "femur_left": ("femur_left",), "femur_right": ("femur_right",)}

#: Length of the proximal femur (below the head's top) whose projection a femur's similarity is judged on.
PROXIMAL_FEMUR_MM = 80.0

#: Units of the optimiser's parameters: degrees (rotation vector) and mm (camera x, y, depth z).
PARAMETER_SCALE = np.array([5.0, 5.0, 5.0, 10.0, 10.0, 30.0])


@dataclass(frozen=True)
class RegistrationSettings:
    """Args:
        level_pixels_mm: Detector pixel size of each level (coarse to fine); the radiograph is binned
            by the nearest integer factor.
        generations: CMA-ES generations per level.
        sigma: CMA-ES initial step per level, in units of ``PARAMETER_SCALE``.
        population: CMA-ES population size.
        init_shift_mm: Half-width of the initial in-plane shift search.
        qa_pixel_mm: Detector pixel at which the final pose's GC is judged (finer levels are noisier).
        min_gc: Lowest acceptable gradient correlation of the final pose at ``qa_pixel_mm``.
        seed: Random seed of the optimiser.
        restarts: CMA-ES runs of the finest level (different seeds, same start); the best is kept.
        max_restart_spread_mm: Largest acceptable mPD between the best restart and the others (else the
            QA flag ``unstable``). Successful registrations (within 0.5 mm of the truth) spread up to
            0.44 mm (99 of them, README): 1 mm flags an ambiguous optimum, not the optimiser's noise.
        per_structure: Register the pelvis and each femur as rigid bodies of their own after the
            whole-bone registration.
        structure_levels_mm, structure_generations, structure_sigma: The per-structure levels.
        fine_method: Ray integration of the finest level: ``trilinear`` (a smooth interpolant of the CT,
            up to 3x the time of a Siddon DRR on the CPU) or ``siddon``.
        trilinear_step_mm: Sampling step of ``trilinear`` along a ray (None: the smallest voxel spacing,
            one sample per voxel; half of it costs about 1.5x the time).
    """

    level_pixels_mm: tuple[float, ...] = (11.2, 5.6, 2.8, 1.4)
    generations: tuple[int, ...] = (40, 30, 25, 15)
    sigma: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    qa_pixel_mm: float = 2.8
    population: int = 12
    init_shift_mm: float = 60.0
    min_gc: float = 0.35
    seed: int = 0
    restarts: int = 3
    max_restart_spread_mm: float = 1.0
    per_structure: bool = False
    structure_levels_mm: tuple[float, ...] = (2.8, 1.4)
    structure_generations: tuple[int, ...] = (30, 25)
    structure_sigma: tuple[float, ...] = (0.3, 0.1)
    fine_method: str = "trilinear"
    trilinear_step_mm: float | None = None


def bone_points(labels: np.ndarray, index_to_world_: np.ndarray, max_points: int = 5000) -> np.ndarray:
    """World coordinates (mm) of up to ``max_points`` evenly drawn bone voxels (the registered body)."""
    return mask_points(np.isin(labels, [CANONICAL_LABELS[n] for n in BONE_LABELS]), index_to_world_, max_points)


def mask_points(mask: np.ndarray, index_to_world_: np.ndarray, max_points: int = 5000) -> np.ndarray:
    """World coordinates (mm) of up to ``max_points`` evenly drawn voxels of ``mask``."""
    k, j, i = np.nonzero(mask)
    points = np.stack([i, j, k], -1)[:: max(1, len(i) // max_points)].astype(float)
    return points @ index_to_world_[:3, :3].T + index_to_world_[:3, 3]


def gradient_correlation(a: np.ndarray, b: np.ndarray, border: int = 2) -> float:
    """Mean NCC of the Sobel derivatives of two images along rows and columns (-1..1)."""
    inner = (slice(border, -border or None), slice(border, -border or None))
    total = 0.0
    for axis in (0, 1):
        ga = ndimage.sobel(a, axis)[inner].ravel()
        gb = ndimage.sobel(b, axis)[inner].ravel()
        ga = ga - ga.mean()
        gb = gb - gb.mean()
        total += float(ga @ gb / np.sqrt((ga @ ga) * (gb @ gb) + 1e-12))
    return total / 2


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks (the last partial blocks dropped)."""
    r, c = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    return image[:r, :c].reshape(r // factor, factor, c // factor, factor).mean((1, 3))


def binned_geometry(g: Geometry, factor: int) -> Geometry:
    """The detector of ``g`` binned by ``factor`` (same physical extent and principal point)."""
    pr, pc = g.principal_point_px
    return Geometry(g.sdd_mm, g.rows // factor, g.cols // factor, (g.pixel_mm[0] * factor, g.pixel_mm[1] * factor),
                    ((pr + 0.5) / factor - 0.5, (pc + 0.5) / factor - 0.5), g.world_to_camera)


def perturb(pose: np.ndarray, x: np.ndarray, centre_world: np.ndarray) -> np.ndarray:
    """``pose`` moved by ``x`` (rotation vector in degrees about ``centre_world``, then a shift in mm, both
    in camera axes)."""
    c = apply(pose, centre_world)
    rotation = Rotation.from_rotvec(x[:3], degrees=True).as_matrix()
    return translation(c + x[3:]) @ rigid(rotation) @ translation(-c) @ pose


def reprojection_distance_mm(pose: np.ndarray, truth: np.ndarray, geometry: Geometry, points_world: np.ndarray,
                             pose_geometry: Geometry | None = None) -> float:
    """mPD: mean distance on the detector between the two poses' projections of the points, scaled to the
    points' mean depth under ``truth`` (mm at the isocentre). ``pose_geometry``: the detector ``pose``
    was found with, where it differs from the true one (``geometry``), e.g. an SDD from a prior."""
    a = (pose_geometry or geometry).with_pose(pose).project(points_world)
    b = geometry.with_pose(truth).project(points_world)
    depth = apply(truth, points_world)[:, 2].mean()
    return float(np.linalg.norm((a - b) * np.asarray(geometry.pixel_mm), axis=1).mean() * depth / geometry.sdd_mm)


def target_registration_error_mm(pose: np.ndarray, truth: np.ndarray, points_world: np.ndarray) -> dict:
    """mTRE: mean 3D distance (camera frame) of the points under the two poses, with its depth part."""
    d = apply(pose, points_world) - apply(truth, points_world)
    return {"mtre_mm": float(np.linalg.norm(d, axis=1).mean()), "mean_depth_error_mm": float(d[:, 2].mean()),
            "in_plane_mm": float(np.linalg.norm(d[:, :2], axis=1).mean())}


def rotation_error_deg(pose: np.ndarray, truth: np.ndarray) -> float:
    return float(np.degrees(np.linalg.norm(Rotation.from_matrix(pose[:3, :3] @ truth[:3, :3].T).as_rotvec())))


def crop_geometry(g: Geometry, rows: slice, cols: slice) -> Geometry:
    """The part ``[rows, cols]`` of ``g``'s detector (same pixels, same camera)."""
    pr, pc = g.principal_point_px
    return Geometry(g.sdd_mm, rows.stop - rows.start, cols.stop - cols.start, g.pixel_mm,
                    (pr - rows.start, pc - cols.start), g.world_to_camera)


def maximise(objective, sigma: float, generations: int, population: int, seed: int, bound: float = 3.0,
             dimensions: int = 6):
    """CMA-ES over ``dimensions`` parameters in ``[-bound, bound]``, starting at 0.

    Returns:
        (best x, its value, the final step size).
    """
    from cmaes import CMA

    optimiser = CMA(mean=np.zeros(dimensions), sigma=sigma, bounds=np.array([[-bound, bound]] * dimensions),
                    seed=seed, population_size=population)
    best_value, best_x = objective(np.zeros(dimensions)), np.zeros(dimensions)
    for _ in range(generations):
        solutions = []
        for _ in range(optimiser.population_size):
            x = optimiser.ask()
            value = objective(x)
            if value > best_value:
                best_value, best_x = value, x
            solutions.append((x, -value))
        optimiser.tell(solutions)
        if optimiser.should_stop():
            break
    return best_x, best_value, float(optimiser._sigma)


def masked_renderer(density: np.ndarray, mask: np.ndarray, index_to_world_: np.ndarray, device: str,
                    method: str = "siddon", step_mm: float | None = None) -> Renderer:
    """A one-channel renderer of ``density`` inside ``mask``, its grid cropped to the mask's box (rays
    then cross only the part that holds anything: the same DRR, sooner)."""
    k, j, i = np.nonzero(mask)
    lo, hi = np.array([k.min(), j.min(), i.min()]), np.array([k.max(), j.max(), i.max()]) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return Renderer(np.where(mask[box], density[box], 0).astype(np.float32), np.zeros(mask[box].shape, np.uint8),
                    index_to_world_ @ translation(lo[::-1]), method=method, step_mm=step_mm, device=device)


class _Body:
    """One rigid body's own renderer (its bones only, the grid cropped to them), points and pivot."""

    def __init__(self, density, mask, index_to_world_, pivot_from_top_mm: float | None, device):
        self.renderer = masked_renderer(density, mask, index_to_world_, device)
        self.points = mask_points(mask, index_to_world_)
        self.pivot, self.region_points = self.points.mean(0), self.points
        # A femur turns in its hip joint: 3 rotations about its head, no translation from the pelvis pose.
        self.dimensions = 6 if pivot_from_top_mm is None else 3
        if pivot_from_top_mm is not None:  # a femur: pivot at its head, judged where BMD is measured
            top = self.points[:, 2].max()  # LPS z is superior
            self.pivot = self.points[self.points[:, 2] >= top - pivot_from_top_mm].mean(0)
            self.region_points = self.points[self.points[:, 2] >= top - PROXIMAL_FEMUR_MM]

    def render(self, geometry: Geometry) -> np.ndarray:
        return self.renderer.render(geometry)[0]

    def step(self, x: np.ndarray) -> np.ndarray:
        """The optimiser's parameters as a :func:`perturb` step (rotation vector deg, shift mm)."""
        return np.concatenate([x, np.zeros(6 - len(x))]) * PARAMETER_SCALE


class Registration:
    """Register one CT (bones of a calibrated density volume) to one radiograph.

    Args:
        density: mg/cm3, [k, j, i].
        labels: canonical labels, same grid.
        index_to_world: the grid's 4x4 affine.
        radiograph: (rows, cols), larger = more attenuation.
        geometry: the radiograph's detector (its pose is ignored).
        source_to_patient_mm: distance from the source to the bones' centre for the initial pose.
        settings: :class:`RegistrationSettings`.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(self, density, labels, index_to_world_, radiograph, geometry: Geometry, source_to_patient_mm: float,
                 settings: RegistrationSettings = RegistrationSettings(), device: str = "auto"):
        bone = np.isin(labels, [CANONICAL_LABELS[n] for n in BONE_LABELS])
        if not bone.any():
            raise InputError("no bone in the labels: nothing to register")
        self.renderer = masked_renderer(density, bone, index_to_world_, device)
        if settings.fine_method not in ("siddon", "trilinear"):
            raise ValueError(f"unknown fine_method {settings.fine_method!r} (siddon or trilinear)")
        step = settings.trilinear_step_mm or float(np.linalg.norm(index_to_world_[:3, :3], axis=0).min())
        self.fine_renderer = self.renderer if settings.fine_method == "siddon" else masked_renderer(
            density, bone, index_to_world_, device, settings.fine_method, step)
        self.bone_points = bone_points(labels, index_to_world_)
        self.centre = self.bone_points.mean(0)
        self.radiograph = np.asarray(radiograph, float)
        self.geometry = geometry
        self.settings = settings
        self.initial_pose = ap_pose(self.centre, source_to_patient_mm)
        self.evaluations = 0
        self.bodies: dict[str, _Body] = {}
        if settings.per_structure:
            for name, members in RIGID_BODIES.items():
                mask = np.isin(labels, [CANONICAL_LABELS[m] for m in members])
                if mask.any():
                    self.bodies[name] = _Body(density, mask, index_to_world_,
                                              30.0 if name.startswith("femur") else None, device)

    def _level(self, pixel_mm: float):
        factor = max(1, int(round(pixel_mm / float(np.mean(self.geometry.pixel_mm)))))
        return binned_geometry(self.geometry, factor), bin_image(self.radiograph, factor)

    def similarity(self, pose: np.ndarray, level_geometry: Geometry, image: np.ndarray,
                   renderer: Renderer | None = None) -> float:
        """GC of ``image`` and the bone DRR at ``pose`` (``renderer``: default the coarse levels' Siddon)."""
        self.evaluations += 1
        return gradient_correlation(image, (renderer or self.renderer).render(level_geometry.with_pose(pose))[0])

    def initial_search(self) -> np.ndarray:
        """Best in-plane shift of the AP prior on a grid, at the coarsest level."""
        g, image = self._level(self.settings.level_pixels_mm[0])
        step = max(g.pixel_mm[0] * 2 * 0.8, 5.0)
        shifts = np.arange(-self.settings.init_shift_mm, self.settings.init_shift_mm + 1e-6, step)
        best = (-np.inf, self.initial_pose)
        for dx in shifts:
            for dy in shifts:
                pose = perturb(self.initial_pose, np.array([0, 0, 0, dx, dy, 0.0]), self.centre)
                value = self.similarity(pose, g, image)
                if value > best[0]:
                    best = (value, pose)
        return best[1]

    def run(self, start: np.ndarray | None = None) -> dict:
        """Register from ``start`` (default: the automatic initial pose). Returns the pose record."""
        s = self.settings
        pose = self.initial_search() if start is None else np.asarray(start, float)
        history, flags, bound = [], [], 3.0
        n_levels = len(s.level_pixels_mm)
        spread = None
        for level, (pixel, generations, sigma) in enumerate(zip(s.level_pixels_mm, s.generations, s.sigma)):
            g, image = self._level(pixel)
            renderer = self.fine_renderer if level == n_levels - 1 else self.renderer

            def objective(x, pose=pose, g=g, image=image, renderer=renderer):
                return self.similarity(perturb(pose, x * PARAMETER_SCALE, self.centre), g, image, renderer)

            runs = [maximise(objective, sigma, generations, s.population, s.seed + level + 100 * r, bound)
                    for r in range(s.restarts if level == n_levels - 1 else 1)]
            best_x, best_value, final_sigma = max(runs, key=lambda run: run[1])
            if len(runs) > 1:  # how far the other restarts ended from the best (mm at the isocentre)
                best_pose = perturb(pose, best_x * PARAMETER_SCALE, self.centre)
                spread = max(reprojection_distance_mm(perturb(pose, x * PARAMETER_SCALE, self.centre), best_pose,
                                                      self.geometry.with_pose(best_pose), self.bone_points)
                             for x, _, _ in runs)
            pose = perturb(pose, best_x * PARAMETER_SCALE, self.centre)
            log.info("level %d/%d (%.1f mm pixels, %dx%d): GC %.4f after %d DRRs", level + 1, n_levels,
                     g.pixel_mm[0], g.rows, g.cols, best_value, self.evaluations)
            history.append({"pixel_mm": float(g.pixel_mm[0]), "rows": g.rows, "cols": g.cols, "gc": best_value,
                            "method": renderer.method,
                            "step": best_x.tolist(), "final_sigma": final_sigma, "restarts": len(runs)})
            if np.abs(best_x).max() > 0.98 * bound:
                flags.append(f"at_search_bound (level {level})")
        qa_geometry, qa_image = self._level(s.qa_pixel_mm)
        qa_gc = self.similarity(pose, qa_geometry, qa_image)
        if qa_gc < s.min_gc:
            flags.append("low_similarity")
        if history[-1]["final_sigma"] > s.sigma[-1]:
            flags.append("not_converged")
        if spread is not None and spread > s.max_restart_spread_mm:
            flags.append("unstable")
        record = {"world_to_camera": pose.round(10).tolist(), "similarity": "gradient_correlation",
                  "similarity_value": qa_gc, "similarity_pixel_mm": float(qa_geometry.pixel_mm[0]),
                  "restart_spread_mm": spread, "converged": not flags, "qa_flags": flags, "levels": history,
                  "rotation_centre_world_mm": self.centre.tolist()}
        if self.bodies:
            structures = self.register_structures(pose)
            if "pelvis" in structures:
                record["world_to_camera"] = structures["pelvis"]["world_to_camera"]
            record["structures"] = structures
            flags += [f"{name}: {flag}" for name, body in structures.items() for flag in body["qa_flags"]]
            record["converged"] = not flags
        record["evaluations"] = self.evaluations
        return record

    def _roi(self, body: _Body, pose: np.ndarray, g: Geometry, margin_mm: float = 15.0):
        """Detector rows and columns (slices) where ``body``'s region projects under ``pose``, with a margin."""
        rc = g.with_pose(pose).project(body.region_points)
        m = margin_mm / np.asarray(g.pixel_mm)
        lo = np.maximum(np.floor(rc.min(0) - m), 0).astype(int)
        hi = np.minimum(np.ceil(rc.max(0) + m) + 1, [g.rows, g.cols]).astype(int)
        if np.any(hi - lo < 8):
            return None
        return slice(lo[0], hi[0]), slice(lo[1], hi[1])

    def register_structures(self, pose: np.ndarray) -> dict:
        """Refine each rigid body (pelvis first, then each femur from the pelvis pose), the others held."""
        s = self.settings
        poses = {name: pose for name in self.bodies}
        out = {}
        for name, body in self.bodies.items():
            if name != "pelvis" and "pelvis" in poses:
                poses[name] = poses["pelvis"]
            flags, history, value = [], [], float("nan")
            for level, (pixel, generations, sigma) in enumerate(zip(s.structure_levels_mm, s.structure_generations,
                                                                    s.structure_sigma)):
                g, image = self._level(pixel)
                roi = self._roi(body, poses[name], g)
                rc = g.with_pose(poses[name]).project(body.region_points)
                inside = np.mean((rc >= -0.5).all(1) & (rc < np.array([g.rows, g.cols]) - 0.5).all(1))
                # Too little of a femur's proximal part on the radiograph to pin it down (the pelvis
                # body, with the spine, often reaches beyond the field).
                if roi is None or (body.dimensions == 3 and inside < 0.8):
                    flags.append("outside_detector")
                    break
                g_roi, image_roi = crop_geometry(g, *roi), image[roi]
                held = sum(other.render(g_roi.with_pose(poses[o])) for o, other in self.bodies.items() if o != name)

                def objective(x, start=poses[name], g_roi=g_roi, image_roi=image_roi, held=held, body=body):
                    self.evaluations += 1
                    moved = perturb(start, body.step(x), body.pivot)
                    return gradient_correlation(image_roi, held + body.render(g_roi.with_pose(moved)))

                x, value, final_sigma = maximise(objective, sigma, generations, s.population, s.seed + 10 + level,
                                                 dimensions=body.dimensions)
                poses[name] = perturb(poses[name], body.step(x), body.pivot)
                history.append({"pixel_mm": float(g.pixel_mm[0]), "gc": value, "step": x.tolist(),
                                "final_sigma": final_sigma})
                if np.abs(x).max() > 0.98 * 3.0:
                    flags.append(f"at_search_bound (level {level})")
            log.info("%s: GC %.4f over its region", name, value)
            if history and history[-1]["final_sigma"] > s.structure_sigma[-1]:
                flags.append("not_converged")
            if value < s.min_gc:
                flags.append("low_similarity")
            relative = np.linalg.inv(poses["pelvis"]) @ poses[name] if "pelvis" in poses else np.eye(4)
            out[name] = {"world_to_camera": poses[name].round(10).tolist(), "similarity_value": value,
                         "qa_flags": flags, "levels": history, "rotation_centre_world_mm": body.pivot.tolist(),
                         "rotation_from_pelvis_deg": float(np.degrees(np.linalg.norm(
                             Rotation.from_matrix(relative[:3, :3]).as_rotvec())))}
        return out


def register_case(density_path, labels_path, xray_path, case_json: dict, out_pose, overlay_png=None,
                  settings: RegistrationSettings = RegistrationSettings(), device: str = "auto",
                  sod_prior_mm: float | None = None, sdd_tolerance: float = 0.1) -> dict:
    """Register one ingested case and write pose.json (a full geometry: detector + pose) and overlay.png.

    ``sdd_tolerance``: relative uncertainty of an SDD from the cohort's prior (not from DICOM); pose.json
    then reports ``depth_uncertainty_mm`` (that fraction of the bones' depth), else null.
    """
    density_image = sitk.ReadImage(str(density_path), sitk.sitkFloat32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    radiograph = sitk.GetArrayFromImage(sitk.ReadImage(str(xray_path))).astype(float)
    prior = case_json["geometry_prior"]
    geometry = Geometry(prior["sdd_mm"], prior["rows"], prior["cols"], prior["pixel_mm"], prior["principal_point_px"])
    sod = prior.get("source_to_patient_mm") or sod_prior_mm or 0.82 * prior["sdd_mm"]
    try:
        reg = Registration(sitk.GetArrayFromImage(density_image), labels, index_to_world(density_image), radiograph,
                           geometry, sod, settings, device)
    except InputError as e:
        raise InputError(e.message, labels_path) from e
    record = reg.run()
    record["geometry"] = geometry.with_pose(np.asarray(record["world_to_camera"])).to_dict()
    record["initial_source_to_patient_mm"] = float(sod)
    # One view pins down where each bone projects, not its depth: an SDD (or pixel size) off by a
    # fraction e is absorbed by a depth off by about e x the source-to-patient distance.
    record["sdd_source"] = case_json.get("xray", {}).get("sdd_source", "dicom")
    depth = float(np.mean(apply(np.asarray(record["world_to_camera"]), reg.bone_points)[:, 2]))
    record["depth_uncertainty_mm"] = round(sdd_tolerance * depth, 1) if record["sdd_source"] != "dicom" else None
    if overlay_png:
        overlay(overlay_png, radiograph, reg.renderer.render(Geometry.from_dict(record["geometry"]))[0], record)
    write_json(out_pose, record)
    return record


def overlay(path, radiograph: np.ndarray, drr: np.ndarray, record: dict) -> None:
    """The radiograph with the bone DRR's edges on it, and a checkerboard of the two (each normalised)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def normalise(im):
        lo, hi = np.percentile(im, [1, 99])
        return np.clip((im - lo) / max(hi - lo, 1e-9), 0, 1)

    edges = np.hypot(ndimage.sobel(drr, 0), ndimage.sobel(drr, 1))
    edges = edges > np.percentile(edges, 92)
    tile = max(radiograph.shape) // 8
    r, c = np.indices(radiograph.shape)
    checker = np.where(((r // tile) + (c // tile)) % 2 == 0, normalise(radiograph), normalise(drr))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].imshow(normalise(radiograph), cmap="gray")
    shown = np.ma.masked_where(~edges, edges)
    axes[0].imshow(shown, cmap="autumn", alpha=0.9)
    axes[0].set_title(f"bone DRR edges on the radiograph (GC {record['similarity_value']:.3f})", fontsize=9)
    axes[1].imshow(checker, cmap="gray")
    flags = ", ".join(record["qa_flags"]) or "none"
    axes[1].set_title(f"checkerboard: radiograph / bone DRR; QA flags: {flags}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)




def registration_summary(case_dirs, out_tsv, out_png=None) -> None:
    """One row per case: similarity and QA; where a demo truth.json is known (``truth`` in case.json's
    folder's demo input), mPD, rotation error and mTRE (with its depth part) over the bones. ``out_png``:
    the same as bars, each case's QA flags written beside it."""
    import json

    header = ["case_id", "gc", "converged", "qa_flags", "evaluations", "mpd_mm", "rotation_error_deg", "mtre_mm",
              "depth_error_mm"]
    rows = []
    for d in map(Path, case_dirs):
        record = json.loads((d / "pose.json").read_text())
        truth_path = d.parent / "demo_input" / d.name / "truth.json"
        errors = ["", "", "", ""]
        if truth_path.exists():
            truth = Geometry.from_dict(json.loads(truth_path.read_text())["geometry"])
            labels_image = sitk.ReadImage(str(d / "labels.nii.gz"))
            points = bone_points(sitk.GetArrayFromImage(labels_image), index_to_world(labels_image))
            pose = np.asarray(record["world_to_camera"])
            tre = target_registration_error_mm(pose, truth.world_to_camera, points)
            errors = [f"{reprojection_distance_mm(pose, truth.world_to_camera, truth, points):.3f}",
                      f"{rotation_error_deg(pose, truth.world_to_camera):.3f}", f"{tre['mtre_mm']:.3f}",
                      f"{tre['mean_depth_error_mm']:.3f}"]
        rows.append([d.name, f"{record['similarity_value']:.4f}", str(record["converged"]),
                     ",".join(record["qa_flags"]) or "-", str(record["evaluations"]), *errors])
    with atomic_path(out_tsv) as tmp:
        tmp.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    if out_png:
        summary_figure(out_png, [dict(zip(header, r)) for r in rows])


def summary_figure(path, rows: list[dict]) -> None:
    """Per case: mPD and mTRE against truth (or the similarity, where no truth is known), QA flags beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = all(r["mpd_mm"] for r in rows)
    panels = ([("mpd_mm", "mPD (mm at the isocentre)", 0.5), ("mtre_mm", "mTRE (mm)", None)] if known
              else [("gc", "gradient correlation", None)])
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 0.28 * len(rows) + 1.4), squeeze=False)
    for ax, (key, label, bar) in zip(axes[0], panels):
        values = [float(r[key]) for r in rows]
        ax.barh(y, values, color=["tab:blue" if r["qa_flags"] == "-" else "tab:red" for r in rows])
        if bar:
            ax.axvline(bar, color="k", lw=0.8, ls="--")
        ax.set_yticks(y, [r["case_id"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
    ax = axes[0][-1]
    for i, r in enumerate(rows):
        if r["qa_flags"] != "-":
            ax.annotate(r["qa_flags"], (1.0, i), xycoords=("axes fraction", "data"), fontsize=6, color="tab:red",
                        va="center", xytext=(4, 0), textcoords="offset points")
    fig.suptitle("registration per case (red: QA flags raised" + ("; dashed: the 0.5 mm bar)" if known else ")"),
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
