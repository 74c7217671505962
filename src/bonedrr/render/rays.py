"""Rays of a projection geometry in a volume's continuous index space (array-module generic)."""

from __future__ import annotations

import numpy as np

from bonedrr.geometry import Geometry


def index_rays(geometry: Geometry, world_to_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source and unit-speed directions of every pixel's ray, in index space.

    Returns:
        origin: (3,) the source in continuous voxel indices (i, j, k).
        directions: (rows * cols, 3) index units per mm of path, so a ray parameter is in mm.
    """
    camera_to_world = np.linalg.inv(geometry.world_to_camera)
    pixels = geometry.pixel_centers_camera().reshape(-1, 3)
    unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)  # camera frame, source at 0
    directions_world = unit @ camera_to_world[:3, :3].T
    origin_world = camera_to_world[:3, 3]
    origin = world_to_index[:3, :3] @ origin_world + world_to_index[:3, 3]
    return origin, directions_world @ world_to_index[:3, :3].T


def box_entry_exit(origin, directions, lo, hi, xp=np):
    """Ray parameters (mm) where rays enter and leave the box ``lo <= p <= hi`` (slab method).

    Rays that miss get ``t_enter >= t_exit``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / directions
        t1 = (xp.asarray(lo) - origin) * inverse
        t2 = (xp.asarray(hi) - origin) * inverse
    # A ray parallel to a slab: inside it, any t; outside, none.
    parallel = directions == 0
    inside = (origin >= xp.asarray(lo)) & (origin <= xp.asarray(hi))
    t_low = xp.where(parallel, xp.where(inside, -xp.inf, xp.inf), xp.minimum(t1, t2))
    t_high = xp.where(parallel, xp.where(inside, xp.inf, -xp.inf), xp.maximum(t1, t2))
    t_enter = xp.maximum(t_low.max(axis=1), 0.0)  # not behind the source
    t_exit = t_high.min(axis=1)
    return t_enter, t_exit
