"""Cone-beam ray casting of a density volume into per-structure line integrals (DRRs).

:class:`Renderer` holds one volume (density and a per-voxel channel index) and renders it at any
pose, all channels in one pass. Two ray integrals, the user's choice:

* ``siddon``: exact path lengths through voxels (the volume is piecewise constant; it ends at the
  outer faces of its edge voxels). Each voxel's path length times its density goes to that voxel's
  channel.
* ``trilinear``: the trilinear interpolant of the zero-padded volume, sampled every ``step_mm`` along
  the ray (it reaches one voxel beyond the edge voxels' centres and, integrated over space, conserves
  mass exactly). Each sample's eight corner contributions (weight x density) go to the corners' own
  channels: the partition is the trilinear interpolation of each channel's masked density, so at a
  boundary a sample is shared between the structures in proportion to their weights.

Either way each contribution goes to exactly one channel, so the channels of a partition sum to the
total DRR to float precision.

Backends (``bonedrr.device``): ``compiled``, the default, is numba kernels on the CPU (parallel over
rays; chosen by measurement, see ``benchmarks/drr.py``) and hand-written CUDA kernels on an NVIDIA GPU
(``cuda_kernels``: one thread per ray, rays set up on the GPU; ``benchmarks/drr_gpu.py``); ``array`` is
the same algorithms written with the array module, NumPy or CuPy. The NumPy array path is what the CPU
kernels are tested against, and the CPU kernels are what the CUDA kernels are tested against.
"""

from bonedrr.render.renderer import METHODS, Renderer

__all__ = ["METHODS", "Renderer"]
