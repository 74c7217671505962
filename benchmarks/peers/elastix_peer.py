"""elastix's own 2D/3D rigid registration (``itk-elastix==0.25.4``) as a baseline for ``bonedrr.register``.

Not a dependency of ``bonedrr``; install it for benchmarks only::

    pip install itk-elastix==0.25.4

elastix components used: EulerTransform, RayCastInterpolator (a DRR ray caster),
NormalizedGradientCorrelation, Powell; one elastix run per detector level (``levels``: the
radiograph resampled so that its longer side has that many pixels), each starting from the last.

Convention mapping (ours: ``bonedrr.geometry``; see ``docs/conventions.md``):

* Volume space V. elastix's ray caster ignores the moving image's origin and direction and places
  the volume centred on the origin with identity axes. We hand it the CT with origin
  ``-(N - 1) / 2 * spacing`` and identity direction, so V is that frame, and the real affine is
  folded into the pose: ``M_vw = [[D, o + D c], [0, 1]]`` (D direction, o origin,
  ``c = (N - 1) / 2 * spacing``) takes V to world (LPS).
* Fixed space F. Instead of passing the start pose as ``PreParameters`` (which the ray caster
  applies to the focal point only, and the final ray caster about a different centre), we keep the
  PreParameters at zero and place the detector directly in V under the level's start pose
  ``S = world_to_camera @ M_vw`` (V -> camera): the radiograph becomes a 3D image one slice thick
  whose voxel (col, row, 0) lies at ``inv(S)`` of our pixel centre ``((c - pc) * sx, (r - pr) * sy,
  sdd)``, with direction ``inv(S)[:3, :3]``, and the focal point is the source ``inv(S)[:3, 3]``.
  Image index x = column, y = row, as in ours; no flip.
* Transform. elastix finds the Euler transform ``E`` (F -> V, identity at the start, rotation about
  ``CenterOfRotationPoint`` = the bone centre in V, ITK ``Euler3DTransform`` with ComputeZYX false).
  Camera -> V is then ``E @ inv(S)``, so ``world_to_camera = S @ inv(E) @ inv(M_vw)``.
* Intensities. The CT is given in HU with ``Threshold -1000``: the ray caster integrates
  ``HU + 1000`` (proportional to density) along the ray, larger = more attenuation, like our
  radiograph. The metric (gradient correlation) is insensitive to scale and offset.
* Scales: 180 / pi for the three rotation parameters (radians), 1 for translations (mm), so one
  optimiser unit is 1 degree or 1 mm.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonedrr.geometry import Geometry
from bonedrr.images import index_to_world


def _volume_to_world(ct: sitk.Image) -> np.ndarray:
    """4x4 rigid map from elastix's centred volume frame V to world (LPS mm)."""
    d = np.asarray(ct.GetDirection(), float).reshape(3, 3)
    c = (np.asarray(ct.GetSize(), float) - 1) / 2 * np.asarray(ct.GetSpacing(), float)
    m = np.eye(4)
    m[:3, :3] = d
    m[:3, 3] = np.asarray(ct.GetOrigin(), float) + d @ c
    return m


def _resample_radiograph(radiograph: np.ndarray, geometry: Geometry, longest: int):
    """The radiograph on a coarser detector whose longer side has ``longest`` pixels (same extent).

    Returns:
        (image (rows, cols) float32, Geometry of that detector).
    """
    rows, cols = radiograph.shape
    s = min(1.0, longest / max(rows, cols))
    nr, nc = max(1, round(rows * s)), max(1, round(cols * s))
    sy, sx = geometry.pixel_mm[0] * rows / nr, geometry.pixel_mm[1] * cols / nc
    pr, pc = geometry.principal_point_px
    g = Geometry(geometry.sdd_mm, nr, nc, (sy, sx), ((pr + 0.5) * nr / rows - 0.5, (pc + 0.5) * nc / cols - 0.5))
    img = sitk.GetImageFromArray(radiograph.astype(np.float32))
    img.SetSpacing((geometry.pixel_mm[1], geometry.pixel_mm[0]))  # physical = index * pixel, origin 0
    if s < 1:
        img = sitk.SmoothingRecursiveGaussian(img, [0.5 * sx, 0.5 * sy])
    out = sitk.Resample(img, (nc, nr), sitk.Transform(), sitk.sitkLinear,
                        (0.5 * sx - 0.5 * geometry.pixel_mm[1], 0.5 * sy - 0.5 * geometry.pixel_mm[0]),
                        (sx, sy), (1, 0, 0, 1), 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out), g


def _euler_matrix(params, centre) -> np.ndarray:
    """4x4 of elastix's EulerTransform (ITK Euler3DTransform, ComputeZYX false)."""
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in centre])
    t.SetRotation(*[float(v) for v in params[:3]])
    t.SetTranslation([float(v) for v in params[3:6]])
    m = np.eye(4)
    m[:3, :3] = np.asarray(t.GetMatrix()).reshape(3, 3)
    m[:3, 3] = np.asarray(t.GetTranslation()) + np.asarray(centre) - m[:3, :3] @ np.asarray(centre)
    return m


def _parameter_map(centre_v, iterations: int, threshold_hu: float, max_step: float, step_tolerance: float) -> dict:
    f = lambda *v: [f"{x:.10g}" for x in v]  # noqa: E731
    rot_scale = 180.0 / np.pi
    return {
        "FixedImageDimension": ["3"], "MovingImageDimension": ["3"],
        "FixedInternalImagePixelType": ["float"], "MovingInternalImagePixelType": ["float"],
        "UseDirectionCosines": ["true"],
        "Registration": ["MultiResolutionRegistration"], "NumberOfResolutions": ["1"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"], "FixedImagePyramidSchedule": ["0", "0", "0"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"], "MovingImagePyramidSchedule": ["0", "0", "0"],
        "Transform": ["EulerTransform"], "AutomaticTransformInitialization": ["false"],
        "AutomaticScalesEstimation": ["false"], "Scales": f(rot_scale, rot_scale, rot_scale, 1, 1, 1),
        "CenterOfRotationPoint": f(*centre_v), "HowToCombineTransforms": ["Compose"],
        "Metric": ["NormalizedGradientCorrelation"],
        "Optimizer": ["Powell"], "MaximumNumberOfIterations": [str(iterations)],
        "MaximumStepLength": f(max_step), "StepTolerance": f(step_tolerance), "ValueTolerance": ["1e-8"],
        "Interpolator": ["RayCastInterpolator"], "ResampleInterpolator": ["FinalRayCastInterpolator"],
        "Resampler": ["DefaultResampler"], "Threshold": f(threshold_hu),
        "PreParameters": ["0"] * 6, "FocalPoint": ["0", "0", "0"],  # FocalPoint set per level
        "WriteResultImage": ["false"], "ResultImagePixelType": ["float"], "DefaultPixelValue": ["0"],
        "ShowExactMetricValue": ["false"],
    }


def elastix_register(ct: sitk.Image, radiograph: np.ndarray, geometry: Geometry, start_world_to_camera: np.ndarray,
                     levels=(64, 128, 256), iterations: int = 10, max_step: float = 4.0,
                     step_tolerance: float = 0.01, centre_world=None, threshold_hu: float = -1000.0,
                     work_dir=None) -> dict:
    """Register ``ct`` to ``radiograph`` with elastix's RayCastInterpolator + gradient correlation + Powell.

    Args:
        ct: CT in HU (any direction cosines; world = LPS mm).
        radiograph: (rows, cols) float, larger = more attenuation, on ``geometry``'s detector.
        geometry: Our detector; its ``world_to_camera`` is ignored.
        start_world_to_camera: Starting pose (rigid 4x4, world -> camera).
        levels: Longer detector side (pixels) at each level, coarse to fine.
        iterations: Powell iterations per level.
        max_step: Powell's line-search bracket (``MaximumStepLength``; degrees or mm).
        step_tolerance: Powell's line-search tolerance (``StepTolerance``; degrees or mm; elastix's
            default 0.5 is too coarse for sub-millimetre results).
        centre_world: Centre of rotation (LPS mm); default the centroid of voxels >= 200 HU.
        threshold_hu: Ray-caster threshold (HU); the integral is of ``HU - threshold``.
        work_dir: Folder for elastix's logs (default: a temporary folder, removed).

    Returns:
        {"world_to_camera": 4x4 (our convention), "seconds": float, "metric": final metric value of
        the last level (elastix minimises, so more negative is better) or None}.
    """
    import itk  # imported late: heavy, and optional for bonedrr

    t0 = time.perf_counter()
    m_vw = _volume_to_world(ct)
    m_wv = np.linalg.inv(m_vw)
    ct_arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    if centre_world is None:
        k, j, i = np.nonzero(ct_arr >= 200)
        centre_world = (np.stack([i, j, k], -1).mean(0) @ index_to_world(ct)[:3, :3].T + index_to_world(ct)[:3, 3])
    centre_v = m_wv[:3, :3] @ np.asarray(centre_world, float) + m_wv[:3, 3]
    moving = itk.image_from_array(ct_arr)
    spacing = np.asarray(ct.GetSpacing(), float)
    moving.SetSpacing(spacing.tolist())
    moving.SetOrigin((-(np.asarray(ct.GetSize()) - 1) / 2 * spacing).tolist())

    pose = np.asarray(start_world_to_camera, float)
    metric = None
    tmp = tempfile.TemporaryDirectory(prefix="elastix_") if work_dir is None else None
    out_root = Path(tmp.name if tmp else work_dir)
    try:
        for n, level in enumerate(levels):
            image, g = _resample_radiograph(np.asarray(radiograph, float), geometry, level)
            s = pose @ m_vw  # V -> camera under the current pose
            s_inv = np.linalg.inv(s)
            (pr, pc), (sy, sx) = g.principal_point_px, g.pixel_mm
            fixed = itk.image_from_array(image[None].astype(np.float32))
            fixed.SetSpacing([sx, sy, 1.0])
            fixed.SetOrigin((s_inv[:3, :3] @ [-pc * sx, -pr * sy, g.sdd_mm] + s_inv[:3, 3]).tolist())
            fixed.SetDirection(itk.matrix_from_array(np.ascontiguousarray(s_inv[:3, :3])))
            pmap = _parameter_map(centre_v, iterations, threshold_hu, max_step, step_tolerance)
            pmap["FocalPoint"] = [f"{v:.10g}" for v in s_inv[:3, 3]]
            params = itk.ParameterObject.New()
            params.AddParameterMap(pmap)
            out = out_root / f"level{n}"
            out.mkdir(parents=True, exist_ok=True)
            _, result = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False,
                                                        log_to_file=True, output_directory=str(out))
            e = _euler_matrix([float(v) for v in result.GetParameter(0, "TransformParameters")],
                              [float(v) for v in result.GetParameter(0, "CenterOfRotationPoint")])
            pose = s @ np.linalg.inv(e) @ m_wv
            metric = _final_metric(out / "elastix.log")
    finally:
        if tmp:
            tmp.cleanup()
    return {"world_to_camera": pose, "seconds": time.perf_counter() - t0, "metric": metric}


def _final_metric(log: Path):
    """Last "Final metric value" in an elastix log, or None."""
    try:
        hits = re.findall(r"Final metric value\s*=\s*([-+0-9.eE]+)", log.read_text(errors="replace"))
    except OSError:
        return None
    return float(hits[-1]) if hits else None
