"""The same two integrals written with the array module (NumPy on the CPU, CuPy on a GPU).

Vectorised over rays, looping over samples (trilinear) or over sorted plane crossings (Siddon);
accumulation per channel with ``bincount``. On the CPU this is the slow reference the compiled
kernels are tested against; on a GPU it is the CuPy path.
"""

from __future__ import annotations

import numpy as np


def trilinear(xp, density, channels, n_channels, origin, directions, t_enter, t_exit, step):
    """(rays, channels) line integrals, density x mm."""
    nz, ny, nx = density.shape
    n_rays = directions.shape[0]
    out = xp.zeros(n_rays * n_channels, dtype=xp.float64)
    ray_index = xp.arange(n_rays)
    hit = t_exit > t_enter
    n_steps = int(xp.ceil(((t_exit - t_enter)[hit]).max() / step)) if bool(hit.any()) else 0
    flat_density = density.ravel()
    flat_channels = channels.ravel().astype(xp.int64)
    for s in range(n_steps):
        t = t_enter + (s + 0.5) * step
        live = hit & (t < t_exit)
        if not bool(live.any()):
            continue
        p = origin[None, :] + t[:, None] * directions
        base = xp.floor(p)
        frac = p - base
        base = base.astype(xp.int64)
        for c in range(8):
            offset = xp.asarray([c & 1, (c >> 1) & 1, (c >> 2) & 1])
            idx = base + offset
            w = xp.prod(xp.where(offset.astype(bool), frac, 1.0 - frac), axis=1)
            inside = live & (idx[:, 0] >= 0) & (idx[:, 1] >= 0) & (idx[:, 2] >= 0) & (idx[:, 0] < nx) & (
                idx[:, 1] < ny) & (idx[:, 2] < nz)
            flat = xp.where(inside, (idx[:, 2] * ny + idx[:, 1]) * nx + idx[:, 0], 0)
            value = xp.where(inside, flat_density[flat] * w * step, 0.0)
            out += xp.bincount(ray_index * n_channels + flat_channels[flat], weights=value,
                               minlength=n_rays * n_channels)
    return out.reshape(n_rays, n_channels)


def siddon(xp, density, channels, n_channels, origin, directions, t_enter, t_exit, rays_per_chunk=4096):
    """(rays, channels) exact path-length integrals, density x mm."""
    nz, ny, nx = density.shape
    n_rays = directions.shape[0]
    out = xp.zeros((n_rays, n_channels), dtype=xp.float64)
    flat_density = density.ravel()
    flat_channels = channels.ravel().astype(xp.int64)
    planes = [xp.arange(n + 1, dtype=xp.float64) - 0.5 for n in (nx, ny, nz)]
    for r0 in range(0, n_rays, rays_per_chunk):
        d = directions[r0:r0 + rays_per_chunk]
        t0, t1 = t_enter[r0:r0 + rays_per_chunk], t_exit[r0:r0 + rays_per_chunk]
        with np.errstate(divide="ignore", invalid="ignore"):  # (CuPy has no errstate and does not warn)
            crossings = [(planes[a][None, :] - origin[a]) / d[:, a:a + 1] for a in range(3)]
        t = xp.concatenate([t0[:, None], t1[:, None], *crossings], axis=1)
        t = xp.where(xp.isfinite(t), t, t0[:, None])
        t = xp.sort(xp.clip(t, t0[:, None], xp.maximum(t1, t0)[:, None]), axis=1)
        length = xp.diff(t, axis=1)
        mid = (t[:, 1:] + t[:, :-1]) / 2
        p = origin[None, None, :] + mid[..., None] * d[:, None, :]
        idx = xp.floor(p + 0.5).astype(xp.int64)
        inside = (length > 0) & (idx[..., 0] >= 0) & (idx[..., 1] >= 0) & (idx[..., 2] >= 0) & (
            idx[..., 0] < nx) & (idx[..., 1] < ny) & (idx[..., 2] < nz)
        flat = xp.where(inside, (idx[..., 2] * ny + idx[..., 1]) * nx + idx[..., 0], 0)
        value = xp.where(inside, flat_density[flat] * length, 0.0)
        rays = xp.arange(d.shape[0])[:, None] * n_channels
        out[r0:r0 + d.shape[0]] = xp.bincount((rays + flat_channels[flat]).ravel(), weights=value.ravel(),
                                              minlength=d.shape[0] * n_channels).reshape(-1, n_channels)
    return out
