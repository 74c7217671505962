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
