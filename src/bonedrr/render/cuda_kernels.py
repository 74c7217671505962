"""Hand-written CUDA kernels (CuPy RawKernel), one thread per ray: the same algorithms as
``cpu_kernels`` (which the GPU tests compare them with). Units: density x mm; the caller scales.

Each thread accumulates its ray's channels in ``out[channel * n_rays + ray]`` (no atomics: a ray is
one thread's): channel-major, so the 32 rays of a warp, neighbouring pixels, add to neighbouring
addresses. A thread sums the run of samples of one channel in a register and adds it to ``out`` only
when the channel changes: along a ray through a label map the channel changes a few dozen times, not
at every voxel. The volume is read through the read-only data cache (``__ldg``).

Each thread also sets up its own ray (``ray_of``): direction and box entry and exit from a few
numbers per DRR (:func:`ray_parameters`), the same arithmetic as ``rays.index_rays`` and
``rays.box_entry_exit``. Setting up 65536 rays on the host and copying them over cost six times the
kernel's own time (``benchmarks/results/drr_gpu.json``).
"""

from __future__ import annotations

import numpy as np

_SOURCE = r"""
// NVRTC compiles without <math.h>, so there is no INFINITY macro
#define BONEDRR_INF __longlong_as_double(0x7ff0000000000000LL)

// Ray r (pixel row = r / cols, col = r % cols) in index space, from g (see ray_parameters):
// g[0..8] camera -> index rotation (row-major), g[9..11] the source (index), g[12] sdd, g[13..14]
// principal point (row, col), g[15..16] pixel size (row, col), g[17..19] box low, g[20..22] box high.
// Direction in index units per mm; [t0, t1] the part of the ray in the box (mm), empty if t1 <= t0.
// The 23 numbers travel as kernel arguments, not as an array: copying an array to the GPU before each
// launch would wait for the previous DRR's kernel, and the host's set-up would no longer overlap it.
#define RAY_ARGS double g0, double g1, double g2, double g3, double g4, double g5, double g6, double g7, \
    double g8, double g9, double g10, double g11, double g12, double g13, double g14, double g15, double g16, \
    double g17, double g18, double g19, double g20, double g21, double g22
#define RAY_ARRAY const double g[23] = {g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15, \
    g16, g17, g18, g19, g20, g21, g22}

__device__ void ray_of(int r, int cols, const double* g, double* d, double* t0, double* t1)
{
    int row = r / cols, col = r - row * cols;
    double cx = (col - g[14]) * g[16], cy = (row - g[13]) * g[15], cz = g[12];
    double norm = sqrt(cx * cx + cy * cy + cz * cz);
    cx /= norm; cy /= norm; cz /= norm;
    double lo = 0.0, hi = BONEDRR_INF;  // not behind the source
    for (int a = 0; a < 3; ++a) {
        d[a] = g[3 * a] * cx + g[3 * a + 1] * cy + g[3 * a + 2] * cz;
        double o = g[9 + a], box_lo = g[17 + a], box_hi = g[20 + a];
        if (d[a] == 0.0) {
            if (o < box_lo || o > box_hi) hi = -BONEDRR_INF;
        } else {
            double ta = (box_lo - o) / d[a], tb = (box_hi - o) / d[a];
            lo = fmax(lo, fmin(ta, tb));
            hi = fmin(hi, fmax(ta, tb));
        }
    }
    *t0 = lo;
    *t1 = hi;
}

extern "C" __global__
void siddon(const float* __restrict__ density, const unsigned char* __restrict__ channels,
            int nx, int ny, int nz, RAY_ARGS, int cols, int n_rays, int n_channels, double* __restrict__ out)
{
    int r = blockDim.x * blockIdx.x + threadIdx.x;
    if (r >= n_rays) return;
    RAY_ARRAY;
    double dir[3], t, t_end;
    ray_of(r, cols, g, dir, &t, &t_end);
    if (t_end <= t) return;
    double dx = dir[0], dy = dir[1], dz = dir[2], ox = g[9], oy = g[10], oz = g[11];
    double eps = 1e-9 * (1.0 + fabs(t));
    int ix = min(max((int)floor(ox + (t + eps) * dx + 0.5), 0), nx - 1);
    int iy = min(max((int)floor(oy + (t + eps) * dy + 0.5), 0), ny - 1);
    int iz = min(max((int)floor(oz + (t + eps) * dz + 0.5), 0), nz - 1);
    int sx = dx > 0 ? 1 : -1, sy = dy > 0 ? 1 : -1, sz = dz > 0 ? 1 : -1;
    double tx = dx != 0 ? (ix + 0.5 * sx - ox) / dx : BONEDRR_INF;
    double ty = dy != 0 ? (iy + 0.5 * sy - oy) / dy : BONEDRR_INF;
    double tz = dz != 0 ? (iz + 0.5 * sz - oz) / dz : BONEDRR_INF;
    double ddx = dx != 0 ? fabs(1.0 / dx) : BONEDRR_INF;
    double ddy = dy != 0 ? fabs(1.0 / dy) : BONEDRR_INF;
    double ddz = dz != 0 ? fabs(1.0 / dz) : BONEDRR_INF;
    double* acc = out + r;  // channel c at acc[c * n_rays]
    int run_channel = -1;
    double run = 0.0;
    while (t < t_end) {
        double t_next = fmin(fmin(tx, ty), fmin(tz, t_end));
        long long v_index = ((long long)iz * ny + iy) * nx + ix;
        float v = __ldg(density + v_index);
        if (v != 0.0f) {
            int c = __ldg(channels + v_index);
            if (c != run_channel) {
                if (run_channel >= 0) acc[(long long)run_channel * n_rays] += run;
                run_channel = c;
                run = 0.0;
            }
            run += v * (t_next - t);
        }
        t = t_next;
        if (t >= t_end) break;
        if (tx <= ty && tx <= tz) { ix += sx; tx += ddx; if (ix < 0 || ix >= nx) break; }
        else if (ty <= tz) { iy += sy; ty += ddy; if (iy < 0 || iy >= ny) break; }
        else { iz += sz; tz += ddz; if (iz < 0 || iz >= nz) break; }
    }
    if (run_channel >= 0) acc[(long long)run_channel * n_rays] += run;
}

extern "C" __global__
void trilinear(const float* __restrict__ padded, const unsigned char* __restrict__ channels,
               int nx, int ny, int nz, RAY_ARGS, int cols, int n_rays, int n_channels, double step,
               double* __restrict__ out)
{
    // padded, channels: one zero voxel on every side, sizes (nz + 2, ny + 2, nx + 2).
    int r = blockDim.x * blockIdx.x + threadIdx.x;
    if (r >= n_rays) return;
    RAY_ARRAY;
    double dir[3], t0, t1;
    ray_of(r, cols, g, dir, &t0, &t1);
    if (t1 <= t0) return;
    double dx = dir[0], dy = dir[1], dz = dir[2], ox = g[9], oy = g[10], oz = g[11];
    int px_ = nx + 2, py_ = ny + 2;
    double* acc = out + r;  // channel c at acc[c * n_rays]
    int run_channel = -1;
    double run = 0.0;
    int n = (int)ceil((t1 - t0) / step);
    for (int s = 0; s < n; ++s) {
        double t = t0 + (s + 0.5) * step;
        if (t >= t1) break;
        double px = ox + 1.0 + t * dx, py = oy + 1.0 + t * dy, pz = oz + 1.0 + t * dz;
        int x0 = (int)px, y0 = (int)py, z0 = (int)pz;
        double fx = px - x0, fy = py - y0, fz = pz - z0;
        for (int c = 0; c < 8; ++c) {
            int xi = x0 + (c & 1), yi = y0 + ((c >> 1) & 1), zi = z0 + ((c >> 2) & 1);
            long long v_index = ((long long)zi * py_ + yi) * px_ + xi;
            float v = __ldg(padded + v_index);
            if (v != 0.0f) {
                double w = ((c & 1) ? fx : 1.0 - fx) * ((c & 2) ? fy : 1.0 - fy) * ((c & 4) ? fz : 1.0 - fz);
                int label = __ldg(channels + v_index);
                if (label != run_channel) {
                    if (run_channel >= 0) acc[(long long)run_channel * n_rays] += run;
                    run_channel = label;
                    run = 0.0;
                }
                run += w * v * step;
            }
        }
    }
    if (run_channel >= 0) acc[(long long)run_channel * n_rays] += run;
}
"""

#: NVRTC options (tests/test_cuda_source.py compiles the source with them where no GPU is present).
COMPILE_OPTIONS = ("-std=c++11",)
_MODULE = None
THREADS_PER_BLOCK = 128


def _module():
    global _MODULE
    if _MODULE is None:
        import cupy

        _MODULE = cupy.RawModule(code=_SOURCE, options=COMPILE_OPTIONS)
    return _MODULE


def ray_parameters(geometry, world_to_index: np.ndarray, box_lo, box_hi) -> np.ndarray:
    """The 23 numbers from which ``ray_of`` sets up every ray of ``geometry`` (layout in the source).

    Args:
        geometry: The projection (``bonedrr.geometry.Geometry``).
        world_to_index: 4x4, world (LPS mm) to continuous voxel index (i, j, k).
        box_lo, box_hi: The box (index space) the rays are clipped to.
    """
    camera_to_world = np.linalg.inv(geometry.world_to_camera)
    rotation = world_to_index[:3, :3] @ camera_to_world[:3, :3]  # index units per mm of camera frame
    source = world_to_index[:3, :3] @ camera_to_world[:3, 3] + world_to_index[:3, 3]
    (pr, pc), (sr, sc) = geometry.principal_point_px, geometry.pixel_mm
    return np.concatenate([rotation.ravel(), source, [geometry.sdd_mm, pr, pc, sr, sc], box_lo, box_hi]
                          ).astype(np.float64)


def rays_of_parameters(g: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy twin of the kernels' ``ray_of``: (directions (n, 3), t_enter, t_exit) of every ray. The CPU
    tests hold it against ``rays.index_rays`` and ``rays.box_entry_exit``."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    camera = np.stack([(c - g[14]) * g[16], (r - g[13]) * g[15], np.full(r.shape, g[12])], 1)
    camera /= np.linalg.norm(camera, axis=1, keepdims=True)
    d = camera @ g[:9].reshape(3, 3).T
    lo, hi = np.zeros(len(d)), np.full(len(d), np.inf)
    for a in range(3):
        o, box_lo, box_hi = g[9 + a], g[17 + a], g[20 + a]
        parallel = d[:, a] == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (box_lo - o) / d[:, a], (box_hi - o) / d[:, a]
        lo = np.where(parallel, lo, np.maximum(lo, np.minimum(ta, tb)))
        hi = np.where(parallel, np.where((o < box_lo) | (o > box_hi), -np.inf, hi), np.minimum(hi, np.maximum(ta, tb)))
    return d, lo, hi


def render(method, density, channels, shape, n_channels, ray_params: np.ndarray, rows: int, cols: int, step):
    """(channels, rays) float64 CuPy array, in mg/cm3 x mm. ``shape`` is the unpadded (nz, ny, nx);
    ``ray_params`` from :func:`ray_parameters`."""
    import cupy

    nz, ny, nx = shape
    n_rays = rows * cols
    out = cupy.zeros((n_channels, n_rays), cupy.float64)
    blocks = (n_rays + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    common = (density, channels, cupy.int32(nx), cupy.int32(ny), cupy.int32(nz),
              *[float(v) for v in ray_params], cupy.int32(cols), cupy.int32(n_rays), cupy.int32(n_channels))
    if method == "siddon":
        _module().get_function("siddon")((blocks,), (THREADS_PER_BLOCK,), (*common, out))
    else:
        _module().get_function("trilinear")((blocks,), (THREADS_PER_BLOCK,), (*common, float(step), out))
    return out
