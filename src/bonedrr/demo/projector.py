"""The simulator's own cone-beam projector: dense point sampling with SciPy.

Deliberately independent of the pipeline's renderer (``bonedrr.drr``): it samples each ray at a
fixed step with trilinear interpolation (``scipy.ndimage.map_coordinates``) instead of tracing voxel
boundaries, so that the demo's radiographs do not share the renderer's discretisation. The volume is
taken to end half a voxel beyond its edge voxels' centres (values fall linearly to zero there).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonedrr.geometry import Geometry, apply
from bonedrr.images import index_to_world


def project(volumes: dict[str, np.ndarray], grid: sitk.Image, geometry: Geometry, step_mm: float = 1.5,
            rows_per_chunk: int = 16) -> dict[str, np.ndarray]:
    """Line integrals of each volume along the rays of ``geometry``.

    Args:
        volumes: name -> density volume in g/cm3, indexed [k, j, i] on ``grid``.
        grid: The image whose origin, spacing and direction place the volumes in the world.
        geometry: Camera and pose.
        step_mm: Sampling step along each ray.
        rows_per_chunk: Detector rows sampled at once (bounds memory).

    Returns:
        name -> (rows, cols) line integrals in g/cm2.
    """
    world_to_index = np.linalg.inv(index_to_world(grid))
    camera_to_world = np.linalg.inv(geometry.world_to_camera)
    source = apply(world_to_index, geometry.source_world())
    # Rays in index space: source + t * direction, t in mm along the ray.
    directions_world = apply(camera_to_world, geometry.pixel_centers_camera()) - geometry.source_world()
    directions_world /= np.linalg.norm(directions_world, axis=-1, keepdims=True)
    directions = directions_world @ world_to_index[:3, :3].T
    t_lo, t_hi = _box_entry_exit(source, directions, grid.GetSize())
    t_lo, t_hi = float(np.nanmin(t_lo)), float(np.nanmax(t_hi))
    out = {name: np.zeros((geometry.rows, geometry.cols)) for name in volumes}
    if not np.isfinite(t_lo) or t_hi <= t_lo:
        return out  # no ray meets the volume
    t = np.arange(t_lo + step_mm / 2, t_hi, step_mm)
    for r0 in range(0, geometry.rows, rows_per_chunk):
        d = directions[r0:r0 + rows_per_chunk]  # (r, c, 3), index units per mm
        pts = source + d[..., None, :] * t[:, None]  # (r, c, n, 3) as (i, j, k)
        coords = pts[..., ::-1].reshape(-1, 3).T  # map_coordinates wants (k, j, i)
        for name, vol in volumes.items():
            samples = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)
            out[name][r0:r0 + rows_per_chunk] = samples.reshape(pts.shape[:3]).sum(-1) * step_mm / 10.0
    return out


def _box_entry_exit(origin: np.ndarray, directions: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameters where rays enter and leave the box [-0.5, n - 0.5] of index space (slab method)."""
    lo = np.full(3, -0.5)
    hi = np.asarray(size, float) - 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo - origin) / directions
        t2 = (hi - origin) / directions
    t_enter = np.nanmax(np.minimum(t1, t2), axis=-1)
    t_exit = np.nanmin(np.maximum(t1, t2), axis=-1)
    miss = t_exit <= t_enter
    return np.where(miss, np.nan, t_enter), np.where(miss, np.nan, t_exit)
