"""Compiled CPU kernels (numba, parallel over rays). Units: density x mm; the caller scales.

Both kernels write ``out[ray, channel]``: each ray is one thread's, so no two threads write the
same memory.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np

# A scheduler's thread budget (Snakemake and SLURM jobs set OMP_NUM_THREADS to the job's threads):
# numba would otherwise start one thread per core of the node and oversubscribe it.
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    numba.set_num_threads(max(1, min(int(os.environ["OMP_NUM_THREADS"]), numba.config.NUMBA_NUM_THREADS)))


@numba.njit(parallel=True, fastmath=True, cache=True)
def siddon(density, channels, origin, directions, t_enter, t_exit, out):  # pragma: no cover - compiled
    """Exact path lengths: voxel (i, j, k) is the cube [i-0.5, i+0.5] x ... in index space."""
    nz, ny, nx = density.shape
    for r in numba.prange(directions.shape[0]):
        t = t_enter[r]
        t_end = t_exit[r]
        if t_end <= t:
            continue
        dx, dy, dz = directions[r, 0], directions[r, 1], directions[r, 2]
        # Start a hair inside the box so that the first voxel is the one the ray enters.
        eps = 1e-9 * (1.0 + abs(t))
        px = origin[0] + (t + eps) * dx
        py = origin[1] + (t + eps) * dy
        pz = origin[2] + (t + eps) * dz
        ix = min(max(int(math.floor(px + 0.5)), 0), nx - 1)
        iy = min(max(int(math.floor(py + 0.5)), 0), ny - 1)
        iz = min(max(int(math.floor(pz + 0.5)), 0), nz - 1)
        sx = 1 if dx > 0 else -1
        sy = 1 if dy > 0 else -1
        sz = 1 if dz > 0 else -1
        inf = np.inf
        tx = (ix + 0.5 * sx - origin[0]) / dx if dx != 0 else inf
        ty = (iy + 0.5 * sy - origin[1]) / dy if dy != 0 else inf
        tz = (iz + 0.5 * sz - origin[2]) / dz if dz != 0 else inf
        ddx = abs(1.0 / dx) if dx != 0 else inf
        ddy = abs(1.0 / dy) if dy != 0 else inf
        ddz = abs(1.0 / dz) if dz != 0 else inf
        while t < t_end:
            t_next = min(tx, ty, tz, t_end)
            v = density[iz, iy, ix]
            if v != 0.0:
                out[r, channels[iz, iy, ix]] += v * (t_next - t)
            t = t_next
            if t >= t_end:
                break
            if tx <= ty and tx <= tz:
                ix += sx
                tx += ddx
                if ix < 0 or ix >= nx:
                    break
            elif ty <= tz:
                iy += sy
                ty += ddy
                if iy < 0 or iy >= ny:
                    break
            else:
                iz += sz
                tz += ddz
                if iz < 0 or iz >= nz:
                    break


@numba.njit(parallel=True, fastmath=True, cache=True)
def trilinear(padded, channels, origin, directions, t_enter, t_exit, step, out):  # pragma: no cover
    """Midpoint samples every ``step`` mm of the trilinear interpolant of the zero-padded volume.

    ``padded`` and ``channels`` carry one zero voxel on every side (index + 1), so the eight corners
    of any sample inside the box [-1, n) need no bounds checks.
    """
    for r in numba.prange(directions.shape[0]):
        t0 = t_enter[r]
        t1 = t_exit[r]
        if t1 <= t0:
            continue
        dx, dy, dz = directions[r, 0], directions[r, 1], directions[r, 2]
        ox, oy, oz = origin[0] + 1.0, origin[1] + 1.0, origin[2] + 1.0
        n = int(math.ceil((t1 - t0) / step))
        for s in range(n):
            t = t0 + (s + 0.5) * step
            if t >= t1:
                break
            px = ox + t * dx
            py = oy + t * dy
            pz = oz + t * dz
            x0 = int(px)  # >= 0 inside the box: int() is floor
            y0 = int(py)
            z0 = int(pz)
            fx = px - x0
            fy = py - y0
            fz = pz - z0
            gx = 1.0 - fx
            gy = 1.0 - fy
            gz = 1.0 - fz
            for c in range(8):
                xi = x0 + (c & 1)
                yi = y0 + ((c >> 1) & 1)
                zi = z0 + ((c >> 2) & 1)
                v = padded[zi, yi, xi]
                if v != 0.0:
                    w = (fx if c & 1 else gx) * (fy if c & 2 else gy) * (fz if c & 4 else gz)
                    out[r, channels[zi, yi, xi]] += w * v * step
