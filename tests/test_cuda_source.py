"""The CUDA kernels' source compiles with NVRTC, the compiler CuPy uses at run time, also where no GPU
is present: NVRTC needs no device. (The test extra installs NVRTC; skipped where it is missing.)

It caught a real bug: the kernels used ``INFINITY``, which NVRTC, compiling without <math.h>, does
not define, so every compiled CUDA path failed on the first GPU it met."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os

import pytest

from bonedrr.render.cuda_kernels import _SOURCE, COMPILE_OPTIONS


def _nvrtc() -> ctypes.CDLL | None:
    candidates = []
    for package in ("nvidia.cuda_nvrtc", "nvidia.cu13", "nvidia"):
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            continue
        for root in spec.submodule_search_locations or [] if spec else []:
            candidates += sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True))
    found = ctypes.util.find_library("nvrtc")
    candidates += [found] if found else []
    for path in candidates:
        if "builtins" in os.path.basename(path) or ".alt." in os.path.basename(path):
            continue
        try:
            # NVRTC dlopens its builtins by name at compile time: load them first from beside it
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _nvrtc()


def compile_source(source: str, options: tuple[str, ...]) -> tuple[int, str, bytes]:
    """(NVRTC status, compile log, PTX) for ``source``."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"bonedrr.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if status == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace"), ptx


@pytest.mark.skipif(NVRTC is None, reason="NVRTC not installed (pip install -e '.[test]' installs it)")
def test_the_cuda_kernels_compile_with_nvrtc():
    status, log, ptx = compile_source(_SOURCE, (*COMPILE_OPTIONS, "--gpu-architecture=compute_80"))
    assert status == 0, log
    for kernel in ("siddon", "trilinear"):
        assert f".entry {kernel}(".encode() in ptx
    # the check is real: the macro the kernels used before does not exist under NVRTC
    status, log, _ = compile_source('extern "C" __global__ void f(double* x) { x[0] = INFINITY; }',
                                    COMPILE_OPTIONS)
    assert status != 0 and 'identifier "INFINITY" is undefined' in log


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_the_kernels_ray_set_up_is_the_host_ray_set_up(real_ct, method):
    """The kernels set up their own rays from ``ray_parameters``; its NumPy twin (the same arithmetic as
    ``ray_of``) gives the rays of ``index_rays`` and ``box_entry_exit``, on the real CT at a tilted pose
    with an off-centre principal point, including the rays that miss the volume."""
    import numpy as np

    from bonedrr.geometry import Geometry, ap_pose
    from bonedrr.images import index_to_world
    from bonedrr.render import Renderer
    from bonedrr.render.cuda_kernels import ray_parameters, rays_of_parameters
    from bonedrr.render.rays import box_entry_exit, index_rays

    density = np.zeros(real_ct.GetSize()[::-1], np.float32)
    renderer = Renderer(density, density.astype(np.uint8), index_to_world(real_ct), n_channels=1, method=method,
                        device="cpu")
    a = index_to_world(real_ct)
    centre = a[:3, :3] @ ((np.array(real_ct.GetSize()) - 1) / 2) + a[:3, 3]
    g = Geometry(1000.0, 96, 80, (3.0, 2.5), (40.0, 30.0), ap_pose(centre, 700.0, (4, -7, 12), (220, 0, 0)))
    origin, directions = index_rays(g, renderer.world_to_index)
    t_enter, t_exit = box_entry_exit(origin[None, :], directions, *renderer._box)
    d, lo, hi = rays_of_parameters(ray_parameters(g, renderer.world_to_index, *renderer._box), g.rows, g.cols)
    np.testing.assert_allclose(d, directions, rtol=1e-12, atol=1e-12)
    hit = t_exit > t_enter
    assert 0.2 < hit.mean() < 1.0  # some rays miss the volume
    np.testing.assert_array_equal(hi > lo, hit)
    np.testing.assert_allclose(lo[hit], t_enter[hit], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(hi[hit], t_exit[hit], rtol=1e-10, atol=1e-9)
