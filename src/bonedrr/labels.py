"""Canonical label names, label-map presets, and the derived proximal femur.

Every label volume downstream of ``segment`` (and the demo's ground truth) uses the canonical ids
below. A segmentation model's own ids are mapped to them by a named preset (config key
``segmentation.preset``) or by a custom ``{model_id: canonical_name}`` mapping.

The proximal femur, the region in which BMD is measured (as DXA's "total hip"), is not a label of its
own: it is derived from a femur label by :func:`proximal_femur_mask`, a documented and configurable cut.

Example:
    >>> import numpy as np
    >>> ts = np.array([0, 75, 76, 77, 80, 27])
    >>> remap(ts, PRESETS["totalsegmentator_v2"]).tolist()
    [0, 1, 2, 3, 5, 13]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Canonical label ids. 0 is background (everything not named here, including soft tissue).
CANONICAL_LABELS: dict[str, int] = {
    "femur_left": 1,
    "femur_right": 2,
    "hip_left": 3,
    "hip_right": 4,
    "gluteus_maximus_left": 5,
    "gluteus_maximus_right": 6,
    "gluteus_medius_left": 7,
    "gluteus_medius_right": 8,
    "gluteus_minimus_left": 9,
    "gluteus_minimus_right": 10,
    "iliopsoas_left": 11,
    "iliopsoas_right": 12,
    "other_bone": 13,  # sacrum, vertebrae, ribs, ...: bone for the `bone` DRR channel, no BMD
}
LABEL_NAMES: dict[int, str] = {v: k for k, v in CANONICAL_LABELS.items()}
BONE_LABELS = ("femur_left", "femur_right", "hip_left", "hip_right", "other_bone")
SIDES = ("left", "right")

_TS_BONES = (
    [25] + list(range(26, 51))  # sacrum, vertebrae S1 .. C1
    + list(range(69, 75))  # humeri, scapulae, claviculae
    + [91] + list(range(92, 117))  # skull, ribs, sternum
)

#: Named label-map presets: model label id -> canonical name.
PRESETS: dict[str, dict[int, str]] = {
    # TotalSegmentator v2, task `total` (ids of its multilabel output).
    "totalsegmentator_v2": {
        75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right",
        80: "gluteus_maximus_left", 81: "gluteus_maximus_right",
        82: "gluteus_medius_left", 83: "gluteus_medius_right",
        84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
        88: "iliopsoas_left", 89: "iliopsoas_right",
        **{i: "other_bone" for i in _TS_BONES},
    },
    # A model trained by this workflow on canonical labels (ids are already canonical).
    "canonical": {v: k for k, v in CANONICAL_LABELS.items()},
}


def remap(labels: np.ndarray, mapping: Mapping[int, str]) -> np.ndarray:
    """Map a model's label ids to canonical ids; unmapped ids become background.

    Args:
        labels: Integer label array of any shape.
        mapping: Model id -> canonical name (a value of :data:`PRESETS` or a custom mapping).

    Returns:
        uint8 array of canonical ids, same shape.

    Raises:
        KeyError: A name in ``mapping`` is not a canonical label.
    """
    lut = np.zeros(max(int(labels.max(initial=0)), max(mapping, default=0)) + 1, np.uint8)
    for model_id, name in mapping.items():
        lut[model_id] = CANONICAL_LABELS[name]
    return lut[np.clip(labels, 0, None).astype(np.int64)]


def proximal_femur_mask(
    labels: np.ndarray,
    side: str,
    superior_mm: np.ndarray,
    length_mm: float = 80.0,
) -> np.ndarray:
    """The proximal femur of one side: femur voxels within ``length_mm`` below the femoral head's top.

    This is the region BMD is measured in (DXA's total hip: head, neck, trochanters and the shaft just
    below the lesser trochanter). The cut is a plane perpendicular to the patient's superior axis,
    ``length_mm`` below the most superior femur voxel of that side. 80 mm reaches about 1.5 cm below
    the lesser trochanter in an adult; a scan that ends higher keeps what it has.

    Args:
        labels: Canonical label volume.
        side: ``"left"`` or ``"right"``.
        superior_mm: Same shape as ``labels``: each voxel's world coordinate along the patient's
            superior axis (LPS z), in mm.
        length_mm: Length of the region along the superior axis.

    Returns:
        Boolean mask, empty if the femur of that side is absent.
    """
    femur = labels == CANONICAL_LABELS[f"femur_{side}"]
    if not femur.any():
        return femur
    top = superior_mm[femur].max()
    return femur & (superior_mm >= top - length_mm)


#: The femoral head, for :func:`femoral_head_centre`: femur voxels within this many mm below the
#: femur's top and within this many mm (in the axial plane) of the top's position.
FEMORAL_HEAD_DEPTH_MM = 40.0
FEMORAL_HEAD_RADIUS_MM = 25.0


def femoral_head_centre(labels: np.ndarray, side: str, voxel_to_world: np.ndarray) -> np.ndarray | None:
    """World position (LPS mm) of one femoral head's centre, or None without that femur.

    Definition (documented in docs/shards.md; the landmark hip crops are centred on): the centroid of
    the femur voxels that lie within :data:`FEMORAL_HEAD_DEPTH_MM` below the femur's most superior
    voxel and within :data:`FEMORAL_HEAD_RADIUS_MM` of that top voxel's position in the axial plane.
    That is the head (an adult's is 40-50 mm across) with at most the start of the neck; the greater
    trochanter, 50 mm or more lateral, is left out. Position along the superior axis: the head's top
    minus about 20 mm.

    Args:
        labels: Canonical label volume, indexed [k, j, i].
        side: ``"left"`` or ``"right"``.
        voxel_to_world: 4x4 affine taking (i, j, k) to world mm (``images.index_to_world``).

    Example:
        >>> lab = np.zeros((60, 10, 10), np.uint8)
        >>> lab[10:50, 3:7, 3:7] = CANONICAL_LABELS["femur_left"]
        >>> femoral_head_centre(lab, "left", np.eye(4)).round(1).tolist()  # k grows superior here
        [4.5, 4.5, 29.5]
    """
    k, j, i = np.nonzero(labels == CANONICAL_LABELS[f"femur_{side}"])
    if k.size == 0:
        return None
    points = np.stack([i, j, k], -1) @ voxel_to_world[:3, :3].T + voxel_to_world[:3, 3]
    top_z = points[:, 2].max()
    top_xy = points[points[:, 2] >= top_z - 1e-6, :2].mean(0)
    head = points[(points[:, 2] >= top_z - FEMORAL_HEAD_DEPTH_MM)
                  & (np.linalg.norm(points[:, :2] - top_xy, axis=1) <= FEMORAL_HEAD_RADIUS_MM)]
    return head.mean(0)
