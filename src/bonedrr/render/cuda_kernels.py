"""Hand-written CUDA kernels (CuPy RawKernel), one thread per ray: the same algorithms as
``cpu_kernels`` (which the GPU tests compare them with). Units: density x mm; the caller scales.

Each thread accumulates its ray's channels in ``out[channel * n_rays + ray]`` (no atomics: a ray is
one thread's): channel-major, so the 32 rays of a warp, neighbouring pixels, add to neighbouring
addresses. A thread sums the run of samples of one channel in a register and adds it to ``out`` only
when the channel changes: along a ray through a label map the channel changes a few dozen times, not
at every voxel. The volume is read through the read-only data cache (``__ldg``).
"""

from __future__ import annotations

_SOURCE = r"""
// NVRTC compiles without <math.h>, so there is no INFINITY macro
#define BONEDRR_INF __longlong_as_double(0x7ff0000000000000LL)

extern "C" __global__
void siddon(const float* __restrict__ density, const unsigned char* __restrict__ channels,
            int nx, int ny, int nz, double ox, double oy, double oz,
            const double* __restrict__ directions, const double* __restrict__ t_enter,
            const double* __restrict__ t_exit, int n_rays, int n_channels, double* __restrict__ out)
{
    int r = blockDim.x * blockIdx.x + threadIdx.x;
    if (r >= n_rays) return;
    double t = t_enter[r], t_end = t_exit[r];
    if (t_end <= t) return;
    double dx = directions[3 * r], dy = directions[3 * r + 1], dz = directions[3 * r + 2];
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
               int nx, int ny, int nz, double ox, double oy, double oz,
               const double* __restrict__ directions, const double* __restrict__ t_enter,
               const double* __restrict__ t_exit, int n_rays, int n_channels, double step,
               double* __restrict__ out)
{
    // padded, channels: one zero voxel on every side, sizes (nz + 2, ny + 2, nx + 2).
    int r = blockDim.x * blockIdx.x + threadIdx.x;
    if (r >= n_rays) return;
    double t0 = t_enter[r], t1 = t_exit[r];
    if (t1 <= t0) return;
    double dx = directions[3 * r], dy = directions[3 * r + 1], dz = directions[3 * r + 2];
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


def render(method, density, channels, shape, n_channels, origin, directions, t_enter, t_exit, step):
    """(rays, channels) float64 CuPy array (a transposed view of the channel-major result). ``shape`` is
    the unpadded (nz, ny, nx)."""
    import cupy

    nz, ny, nx = shape
    n_rays = int(directions.shape[0])
    out = cupy.zeros((n_channels, n_rays), cupy.float64)
    blocks = (n_rays + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    common = (density, channels, cupy.int32(nx), cupy.int32(ny), cupy.int32(nz), float(origin[0]),
              float(origin[1]), float(origin[2]), cupy.ascontiguousarray(directions, cupy.float64),
              cupy.ascontiguousarray(t_enter, cupy.float64), cupy.ascontiguousarray(t_exit, cupy.float64),
              cupy.int32(n_rays), cupy.int32(n_channels))
    if method == "siddon":
        _module().get_function("siddon")((blocks,), (THREADS_PER_BLOCK,), (*common, out))
    else:
        _module().get_function("trilinear")((blocks,), (THREADS_PER_BLOCK,), (*common, float(step), out))
    return out.T
