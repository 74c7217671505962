"""The ``drr`` stage: per-structure DRRs of a calibrated CT at a radiograph's geometry, in g/cm2.

Channels are named groups of structures (config ``drr.channels``); a structure is a canonical label
name, a derived ``proximal_femur_left/right`` (the BMD region), or ``unlabelled`` (everything with
no label: soft tissue, fat, air, organs). One pass of the renderer projects every structure
separately (:data:`STRUCTURES`); a channel is the sum of its structures, so channels made of
disjoint structures that cover everything (``bone`` + ``muscle`` + ``soft_tissue`` by default) sum to
the total DRR. A second pass renders each proximal femur at 1 g/cm3: its thickness channel
(:data:`THICKNESS_CHANNELS`, cm), each ray's chord through the BMD region, from which its volumetric
density is read (:func:`bonedrr.bmd.drr_vbmd`).

Output: ``drr.h5`` with dataset ``drr`` (channels, rows, cols) float32 in g/cm2 (the thickness
channels, last, in cm) and attributes ``channels`` (names), ``units``, ``channel_units`` (JSON: each
channel's), ``method``, ``geometry`` (JSON), ``structures`` (JSON: each
channel's structures), ``femur_poses`` (JSON: the femurs rendered at poses of their own, from a
per-structure registration; ``{}`` when all is at ``geometry``'s pose); and a contact sheet of the channels (``--png``).

Example:
    >>> from bonedrr.drr import channel_matrix, DEFAULT_CHANNELS
    >>> channel_matrix({"bone": DEFAULT_CHANNELS["bone"]}).shape
    (1, 16)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonedrr.errors import InputError
from bonedrr.geometry import Geometry
from bonedrr.images import atomic_path, index_to_world, world_axis_grid
from bonedrr.labels import CANONICAL_LABELS, SIDES, proximal_femur_mask
from bonedrr.render import Renderer

#: What the renderer projects separately: index = its channel in the renderer.
STRUCTURES: tuple[str, ...] = ("unlabelled", *CANONICAL_LABELS, "proximal_femur_left", "proximal_femur_right")
_BONES = ["femur_left", "femur_right", "hip_left", "hip_right", "other_bone", "proximal_femur_left",
          "proximal_femur_right"]
_MUSCLES = [n for n in CANONICAL_LABELS if n.startswith(("gluteus", "iliopsoas"))]

#: Default channels. ``femur_*`` includes its proximal part; ``hip_*`` is one hemipelvis, ``pelvis``
#: both; ``bone`` + ``muscle`` + ``soft_tissue`` is a partition of the body. The shards take each hip's
#: side-normalised channels from these (``bonedrr.shards.CHANNELS``).
DEFAULT_CHANNELS: dict[str, list[str]] = {
    "bone": _BONES,
    "muscle": _MUSCLES,
    "soft_tissue": ["unlabelled"],
    "pelvis": ["hip_left", "hip_right"],
    "hip_left": ["hip_left"],
    "hip_right": ["hip_right"],
    "femur_left": ["femur_left", "proximal_femur_left"],
    "femur_right": ["femur_right", "proximal_femur_right"],
    "proximal_femur_left": ["proximal_femur_left"],
    "proximal_femur_right": ["proximal_femur_right"],
}


#: Thickness channels (cm, not g/cm2): each ray's chord length through the BMD region, which with
#: the proximal-femur channel gives its volumetric density (:func:`bonedrr.bmd.drr_vbmd`). Always
#: rendered, after the density channels.
THICKNESS_CHANNELS: dict[str, str] = {f"proximal_femur_thickness_{side}": f"proximal_femur_{side}" for side in SIDES}
#: 1 g/cm3 in the density volume's unit: a region of it projects to its chord length, g/cm2 = cm.
UNIT_DENSITY_MG_CM3 = 1000.0


def structure_volume(labels: np.ndarray, superior_mm: np.ndarray, cut_mm: float) -> np.ndarray:
    """Per-voxel structure index (:data:`STRUCTURES`): canonical labels, with each femur's proximal
    part split off as its own structure."""
    structures = labels.astype(np.uint8).copy()  # canonical id i is STRUCTURES[i]; 0 = unlabelled
    for side in SIDES:
        structures[proximal_femur_mask(labels, side, superior_mm, cut_mm)] = STRUCTURES.index(
            f"proximal_femur_{side}")
    return structures


def channel_matrix(channels: dict[str, list[str]]) -> np.ndarray:
    """(n_channels, n_structures) 0/1 matrix: which structures each channel sums."""
    m = np.zeros((len(channels), len(STRUCTURES)), np.float32)
    for c, (name, members) in enumerate(channels.items()):
        for s in members:
            if s not in STRUCTURES:
                raise ValueError(f"channel {name!r}: unknown structure {s!r} (known: {', '.join(STRUCTURES)})")
            m[c, STRUCTURES.index(s)] = 1.0
    return m


#: Structures that move with a femur when it has a pose of its own (per-structure registration).
FEMUR_STRUCTURES: dict[str, tuple[str, ...]] = {f"femur_{side}": (f"femur_{side}", f"proximal_femur_{side}")
                                                for side in SIDES}


def structure_poses(record: dict) -> dict[str, np.ndarray]:
    """The femurs' own poses in a pose.json record (per-structure registration), else ``{}``."""
    return {name: np.asarray(body["world_to_camera"], float) for name, body in record.get("structures", {}).items()
            if name in FEMUR_STRUCTURES}


def render_case(density_path: str | Path, labels_path: str | Path, geometry: Geometry, *,
                channels: dict[str, list[str]] | None = None, method: str = "siddon",
                step_mm: float | None = None, device: str = "auto", cut_mm: float = 80.0,
                femur_poses: dict[str, np.ndarray] | None = None) -> dict:
    """Render one case's channels. Returns ``{"drr": (C, rows, cols), "channels": names, ...}``.

    ``femur_poses`` (``femur_left``/``femur_right`` -> world_to_camera, from :func:`structure_poses`):
    each femur's structures are rendered at its own pose, in a pass of their own; everything else at
    ``geometry``'s pose.
    """
    channels = channels or DEFAULT_CHANNELS
    density_image = sitk.ReadImage(str(density_path), sitk.sitkFloat32)
    labels_image = sitk.ReadImage(str(labels_path))
    if labels_image.GetSize() != density_image.GetSize():
        raise InputError(f"label grid {labels_image.GetSize()} differs from the density's "
                         f"{density_image.GetSize()}", labels_path)
    labels = sitk.GetArrayFromImage(labels_image)
    structures = structure_volume(labels, world_axis_grid(labels_image, 2), cut_mm)
    density = sitk.GetArrayFromImage(density_image)
    passes = [(geometry.world_to_camera, np.ones(structures.shape, bool))]
    for femur, pose in (femur_poses or {}).items():
        own = np.isin(structures, [STRUCTURES.index(s) for s in FEMUR_STRUCTURES[femur]])
        passes[0][1][own] = False
        passes.append((pose, own))
    per_structure = 0
    affine = index_to_world(density_image)
    for pose, voxels in passes:
        renderer = Renderer(np.where(voxels, density, 0), structures, affine,
                            n_channels=len(STRUCTURES), method=method, step_mm=step_mm, device=device)
        per_structure = per_structure + renderer.render(geometry.with_pose(pose))
    drr = np.tensordot(channel_matrix(channels), per_structure, axes=1).astype(np.float32)
    thickness = _thickness(structures, passes, affine, geometry, method, step_mm, device)
    return {"drr": np.concatenate([drr, thickness]), "channels": [*channels, *THICKNESS_CHANNELS],
            "structures": {**channels, **{c: [s] for c, s in THICKNESS_CHANNELS.items()}}, "method": method,
            "device": renderer.device, "geometry": geometry.to_dict(), "units": "g/cm2",
            "channel_units": {**{c: "g/cm2" for c in channels}, **{c: "cm" for c in THICKNESS_CHANNELS}},
            "femur_poses": {k: np.asarray(v).round(10).tolist() for k, v in (femur_poses or {}).items()}}


def _thickness(structures: np.ndarray, passes: list, affine: np.ndarray, geometry: Geometry, method: str,
               step_mm: float | None, device: str) -> np.ndarray:
    """(2, rows, cols): each ray's chord through the left and right proximal femur, cm: the regions
    rendered at 1 g/cm3 (so g/cm2 reads as cm), each at its pass's pose, within their bounding box."""
    ids = [STRUCTURES.index(s) for s in THICKNESS_CHANNELS.values()]
    region = np.isin(structures, ids)
    out = np.zeros((len(ids), geometry.rows, geometry.cols), np.float32)
    if not region.any():
        return out
    box = tuple(slice(max(int(w.min()) - 1, 0), int(w.max()) + 2) for w in np.nonzero(region))
    box_affine = affine.copy()
    box_affine[:3, 3] = (affine @ np.array([box[2].start, box[1].start, box[0].start, 1.0]))[:3]  # (i, j, k)
    side = np.zeros(region[box].shape, np.uint8)
    side[structures[box] == ids[1]] = 1
    for pose, voxels in passes:
        unit = np.where(region[box] & voxels[box], UNIT_DENSITY_MG_CM3, 0).astype(np.float32)
        if unit.any():
            out += Renderer(unit, side, box_affine, n_channels=len(ids), method=method, step_mm=step_mm,
                            device=device).render(geometry.with_pose(pose))
    return out


def write_drr(path: str | Path, result: dict) -> None:
    """Write a :func:`render_case` result as HDF5, atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("drr", data=result["drr"], compression="gzip", compression_opts=4)
            f.attrs["channels"] = json.dumps(result["channels"])
            f.attrs["structures"] = json.dumps(result["structures"])
            f.attrs["units"] = result["units"]
            f.attrs["method"] = result["method"]
            f.attrs["geometry"] = json.dumps(result["geometry"])
            f.attrs["femur_poses"] = json.dumps(result.get("femur_poses", {}))
            f.attrs["channel_units"] = json.dumps(result.get("channel_units", {}))


def read_drr(path: str | Path) -> dict:
    """Read ``drr.h5`` back: ``{"drr", "channels", "structures", "units", "method", "geometry", "femur_poses",
    "channel_units"}`` (``channel_units``: each channel's unit; ``{}`` in a file written before it)."""
    import h5py

    with h5py.File(path, "r") as f:
        return {"drr": f["drr"][...], "channels": json.loads(f.attrs["channels"]),
                "structures": json.loads(f.attrs["structures"]), "units": str(f.attrs["units"]),
                "method": str(f.attrs["method"]), "geometry": json.loads(f.attrs["geometry"]),
                "femur_poses": json.loads(f.attrs.get("femur_poses", "{}")),
                "channel_units": json.loads(f.attrs.get("channel_units", "{}"))}


def contact_sheet(path: str | Path, result: dict, radiograph: np.ndarray | None = None) -> None:
    """One panel per channel (own grey scale, colour bar in its unit), the radiograph first if given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("radiograph", radiograph, None)] if radiograph is not None else []) + [
        (name, image, result.get("channel_units", {}).get(name, "g/cm2"))
        for name, image in zip(result["channels"], result["drr"])]
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    aspect = result["geometry"]["pixel_mm"][0] / result["geometry"]["pixel_mm"][1]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, unit) in zip(axes.ravel(), panels):
        shown = ax.imshow(image, cmap="gray", aspect=aspect)
        ax.set_title(name if unit is None else f"{name} (max {image.max():.2f} {unit})", fontsize=8)
        if unit:
            fig.colorbar(shown, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=70)
    plt.close(fig)
