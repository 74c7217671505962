"""Image and JSON I/O shared by all stages: atomic writes, volumes with their world affine.

Volumes are SimpleITK images throughout: SimpleITK reads NIfTI (RAS on disk) into LPS world
coordinates and honours direction cosines, which is the project's world convention. NumPy arrays
taken from them are indexed [k, j, i] (z, y, x), as ``sitk.GetArrayFromImage`` returns them.

Every file is written to a temporary name in its folder and renamed into place, so an output that
exists is complete: a killed job leaves at most a ``.tmp-*`` file, never a truncated result, and the
rerun that writes the same output again removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonedrr.errors import BonedrrError, InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_UMASK = os.umask(0)
os.umask(_UMASK)


def suffix_of(path: str | Path) -> str:
    """The file suffix, counting ``.nii.gz`` as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    Temporary files of ``path`` left by a killed writer are removed first (one job writes an output).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("done")
        >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
        ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise BonedrrError(f"cannot write: {os.strerror(e.errno)}", path) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write a SimpleITK image (compressed where the format allows), atomically."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def read_volume(path: str | Path) -> sitk.Image:
    """Read a NIfTI, MHA/MHD or NRRD volume into LPS world coordinates.

    Raises:
        InputError: Unknown suffix or a file SimpleITK cannot read.
    """
    path = Path(path)
    if suffix_of(path) not in VOLUME_SUFFIXES:
        raise InputError(f"unknown volume format (expected one of {', '.join(VOLUME_SUFFIXES)})", path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise InputError(f"cannot read volume ({reason})", path) from e


def index_to_world(image: sitk.Image) -> np.ndarray:
    """4x4 affine taking continuous voxel indices (i, j, k) = (x, y, z) to world LPS mm."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(image.GetSpacing(), float)
    m[:3, 3] = image.GetOrigin()
    return m


def world_axis_grid(image: sitk.Image, axis: int) -> np.ndarray:
    """World coordinate ``axis`` (0 = x, 1 = y, 2 = z, LPS) of every voxel, as a [k, j, i] array."""
    m = index_to_world(image)
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij", sparse=True)
    return m[axis, 0] * i + m[axis, 1] * j + m[axis, 2] * k + m[axis, 3]


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array`` ([k, j, i]) on the grid of ``reference``."""
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img
