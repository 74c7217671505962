"""The :class:`Renderer`: one volume, rendered at any pose, all channels in one pass."""

from __future__ import annotations

import numpy as np

from bonedrr.device import array_module, resolve_device
from bonedrr.geometry import Geometry
from bonedrr.render import array_kernels
from bonedrr.render.rays import box_entry_exit, index_rays

METHODS = ("siddon", "trilinear")
MG_CM3_MM_TO_G_CM2 = 1e-4  # (mg/cm3) x mm = 1e-3 g / cm3 x 0.1 cm


class Renderer:
    """Cone-beam DRRs of one density volume, split into channels by a per-voxel channel index.

    Args:
        density: Density in mg/cm3, indexed [k, j, i].
        channels: Per-voxel channel index (0 .. n_channels - 1), same shape, integer.
        index_to_world: 4x4 affine from continuous voxel index (i, j, k) to world LPS mm (direction
            cosines honoured: ``bonedrr.images.index_to_world``).
        n_channels: Number of channels (default: ``channels.max() + 1``).
        method: ``siddon`` (exact path lengths) or ``trilinear``.
        step_mm: Trilinear sampling step along a ray (default: half the smallest voxel spacing).
        device: ``auto``, ``cpu`` or ``cuda``.
        backend: ``compiled`` (numba kernels on the CPU, hand-written CUDA kernels on a GPU) or
            ``array`` (the array-module path: NumPy or CuPy, vectorised over rays).

    Example:
        >>> import numpy as np
        >>> from bonedrr.geometry import Geometry, translation
        >>> density = np.full((4, 4, 4), 1000.0, np.float32)  # water, 4 voxels of 10 mm
        >>> affine = np.diag([10.0, 10.0, 10.0, 1.0]); affine[:3, 3] = -15.0
        >>> g = Geometry.centered(1000.0, 1, 1, (1.0, 1.0), translation([0, 0, 500]))
        >>> float(Renderer(density, np.zeros((4, 4, 4), np.uint8), affine, device="cpu").render(g)[0, 0, 0])
        4.0
    """

    def __init__(self, density: np.ndarray, channels: np.ndarray, index_to_world: np.ndarray,
                 n_channels: int | None = None, method: str = "siddon", step_mm: float | None = None,
                 device: str = "auto", backend: str = "compiled"):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        if density.shape != channels.shape or density.ndim != 3:
            raise ValueError(f"density {density.shape} and channels {channels.shape} must be one 3D grid")
        self.method = method
        if backend not in ("compiled", "array"):
            raise ValueError(f"unknown backend {backend!r} (compiled or array)")
        self.device = resolve_device(device)
        self.backend = backend
        self.xp = array_module(self.device)
        self.n_channels = int(n_channels if n_channels is not None else int(channels.max()) + 1)
        self.index_to_world = np.asarray(index_to_world, float)
        self.world_to_index = np.linalg.inv(self.index_to_world)
        spacing = np.linalg.norm(self.index_to_world[:3, :3], axis=0)
        self.step_mm = float(step_mm) if step_mm else float(spacing.min()) / 2
        if self.n_channels > 256:
            raise ValueError(f"at most 256 channels (structures) in one pass, got {self.n_channels}")
        self.shape = density.shape
        density = np.ascontiguousarray(density, dtype=np.float32)
        channels = np.ascontiguousarray(channels, dtype=np.uint8)
        nz, ny, nx = density.shape
        if method == "siddon":  # the volume ends at its outer voxel faces
            self._box = (np.full(3, -0.5), np.array([nx, ny, nz], float) - 0.5)
        else:  # the zero-padded interpolant reaches zero one voxel beyond the edge centres
            self._box = (np.full(3, -1.0), np.array([nx, ny, nz], float) - 1e-6)
            if self.backend == "compiled":  # one zero voxel around: no bounds checks in the kernel
                density, channels = np.pad(density, 1), np.pad(channels, 1)
        self.density, self.channels = self.xp.asarray(density), self.xp.asarray(channels)

    def render(self, geometry: Geometry, on_device: bool = False):
        """DRRs of every channel at ``geometry``: (n_channels, rows, cols) float32 in g/cm2.

        Args:
            geometry: The projection.
            on_device: On a GPU, return the CuPy array and leave it there (for a caller that goes on
                computing on the GPU); otherwise, and always on the CPU, a NumPy array.
        """
        xp = self.xp
        if self.backend == "compiled" and self.device == "cuda":
            from bonedrr.render import cuda_kernels

            params = cuda_kernels.ray_parameters(geometry, self.world_to_index, *self._box)
            out = cuda_kernels.render(self.method, self.density, self.channels, self.shape, self.n_channels,
                                      params, geometry.rows, geometry.cols, self.step_mm)
            drr = (out * MG_CM3_MM_TO_G_CM2).astype(xp.float32).reshape(self.n_channels, geometry.rows,
                                                                         geometry.cols)
            return drr if on_device else drr.get()
        origin, directions = index_rays(geometry, self.world_to_index)
        origin, directions = xp.asarray(origin), xp.asarray(directions)
        t_enter, t_exit = box_entry_exit(origin[None, :], directions, *self._box, xp=xp)
        if self.backend == "compiled":
            from bonedrr.render import cpu_kernels

            out = np.zeros((directions.shape[0], self.n_channels), np.float64)
            args = (self.density, self.channels, origin, directions, t_enter, t_exit)
            if self.method == "siddon":
                cpu_kernels.siddon(*args, out)
            else:
                cpu_kernels.trilinear(*args, self.step_mm, out)
        else:
            kernel = getattr(array_kernels, self.method)
            extra = (self.step_mm,) if self.method == "trilinear" else ()
            out = kernel(xp, self.density, self.channels, self.n_channels, origin, directions, t_enter, t_exit,
                         *extra)
        drr = (out.T * MG_CM3_MM_TO_G_CM2).reshape(self.n_channels, geometry.rows, geometry.cols)
        drr = drr.astype(xp.float32)
        return drr if on_device or not hasattr(drr, "get") else drr.get()
