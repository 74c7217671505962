"""The array-module switch: NumPy/SciPy on the CPU, CuPy on an NVIDIA GPU (``--device auto|cpu|cuda``).

Example:
    >>> resolve_device("cpu")
    'cpu'
"""

from __future__ import annotations

import logging
from functools import lru_cache

from bonedrr.errors import BonedrrError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


@lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise BonedrrError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cpu" or (device == "auto" and not cuda_available()):
        chosen = "cpu"
    elif cuda_available():
        chosen = "cuda"
    else:
        raise BonedrrError("--device cuda was asked for, but CuPy finds no CUDA device "
                           "(install cupy-cuda12x and check nvidia-smi)")
    log.info("device: %s (asked: %s)", chosen, device)
    return chosen


def array_module(device: str):
    """``numpy`` for ``cpu``, ``cupy`` for ``cuda``."""
    if device == "cuda":
        import cupy

        return cupy
    import numpy

    return numpy
