"""Projection geometry: the camera of a radiograph and the pose of a CT in it.

Conventions (binding; see DESIGN.md):

* World: patient space in mm, LPS (x to the patient's left, y posterior, z superior).
* Camera: the X-ray source at the origin, the central ray along +z, the detector plane at
  ``z = sdd_mm``. Detector column index grows with camera +x, row index with camera +y (row 0 is the
  top of the displayed image).
* Pixel (r, c) has its centre at camera point ``((c - pc) * pixel_mm[1], (r - pr) * pixel_mm[0],
  sdd_mm)`` with ``(pr, pc) = principal_point_px``; ``pixel_mm`` is [row spacing, column spacing].
* ``world_to_camera`` is a rigid 4x4 taking world (LPS) points to camera points. A pose may also be
  given as 6 parameters (rotation vector in degrees, translation in mm); the 4x4 is what is stored.

Example:
    >>> g = Geometry(sdd_mm=1000.0, rows=3, cols=3, pixel_mm=(1.0, 1.0),
    ...              principal_point_px=(1.0, 1.0), world_to_camera=translation([0, 0, 500]))
    >>> g.project(np.array([[1.0, 0.0, 0.0]])).round(3).tolist()  # 1 mm at half SDD -> 2 px
    [[1.0, 3.0]]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

#: Rotation taking LPS world axes to the camera of an AP (anteroposterior) radiograph of a supine
#: patient: source anterior, detector posterior, patient's right on the image's left, head at the top.
#: camera x = world x (to the left), camera y = -world z (to the feet), camera z = world y (posterior).
AP_ROTATION = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def translation(t) -> np.ndarray:
    """4x4 homogeneous translation by ``t`` (mm)."""
    m = np.eye(4)
    m[:3, 3] = np.asarray(t, float)
    return m


def rigid(rotation: np.ndarray, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rigid transform from a 3x3 rotation and a translation (mm)."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = np.asarray(t, float)
    return m


def pose_from_params(params) -> np.ndarray:
    """4x4 pose from 6 parameters: rotation vector in degrees (3), translation in mm (3).

    The rotation vector's direction is the axis and its norm the angle (right-hand rule), applied
    before the translation: ``x_cam = R @ x_world + t``.
    """
    p = np.asarray(params, float)
    return rigid(Rotation.from_rotvec(p[:3], degrees=True).as_matrix(), p[3:])


def params_from_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_from_params`."""
    pose = check_rigid(pose)
    rotvec = Rotation.from_matrix(pose[:3, :3]).as_rotvec(degrees=True)
    return np.concatenate([rotvec, pose[:3, 3]])


def check_rigid(m, tol: float = 1e-4) -> np.ndarray:
    """Return ``m`` as a float 4x4 array, or raise ValueError if it is not a proper rigid transform."""
    m = np.asarray(m, float)
    if m.shape != (4, 4):
        raise ValueError(f"a pose must be 4x4, got shape {m.shape}")
    r = m[:3, :3]
    if (not np.allclose(m[3], [0, 0, 0, 1], atol=tol) or not np.allclose(r @ r.T, np.eye(3), atol=tol)
            or np.linalg.det(r) < 0):
        raise ValueError("a pose must be a rigid transform (orthonormal rotation, det +1, last row 0 0 0 1)")
    return m


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points of shape (..., 3)."""
    return points @ m[:3, :3].T + m[:3, 3]


@dataclass(frozen=True)
class Geometry:
    """A cone-beam radiograph's geometry (``geometry.json``).

    Args:
        sdd_mm: Source-to-detector distance in mm.
        rows: Detector rows (image height).
        cols: Detector columns (image width).
        pixel_mm: Detector pixel size in mm at the detector plane, [row spacing, column spacing].
        principal_point_px: (row, column) where the central ray meets the detector, in pixels.
        world_to_camera: Rigid 4x4, world (LPS, mm) to camera (mm).
    """

    sdd_mm: float
    rows: int
    cols: int
    pixel_mm: tuple[float, float]
    principal_point_px: tuple[float, float]
    world_to_camera: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self):
        object.__setattr__(self, "world_to_camera", check_rigid(self.world_to_camera))
        object.__setattr__(self, "pixel_mm", tuple(float(v) for v in self.pixel_mm))
        object.__setattr__(self, "principal_point_px", tuple(float(v) for v in self.principal_point_px))
        if self.sdd_mm <= 0 or min(self.pixel_mm) <= 0 or self.rows < 1 or self.cols < 1:
            raise ValueError("sdd_mm, pixel_mm, rows and cols must be positive")

    @classmethod
    def centered(cls, sdd_mm: float, rows: int, cols: int, pixel_mm, world_to_camera=None) -> "Geometry":
        """A detector whose central ray hits its centre."""
        return cls(sdd_mm, rows, cols, pixel_mm, ((rows - 1) / 2, (cols - 1) / 2),
                   np.eye(4) if world_to_camera is None else world_to_camera)

    def with_pose(self, world_to_camera: np.ndarray) -> "Geometry":
        return Geometry(self.sdd_mm, self.rows, self.cols, self.pixel_mm, self.principal_point_px,
                        world_to_camera)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "sdd_mm": float(self.sdd_mm), "rows": int(self.rows), "cols": int(self.cols),
            "pixel_mm": list(self.pixel_mm), "principal_point_px": list(self.principal_point_px),
            "world_to_camera": np.asarray(self.world_to_camera).round(10).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(float(d["sdd_mm"]), int(d["rows"]), int(d["cols"]), tuple(d["pixel_mm"]),
                   tuple(d["principal_point_px"]), np.asarray(d["world_to_camera"], float))

    @classmethod
    def load(cls, path: str | Path) -> "Geometry":
        """Read ``geometry.json``, or any JSON holding a ``geometry`` object (pose.json, truth.json).

        Raises:
            ValueError: the file is not JSON or holds no valid geometry (the message says what is wrong).
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from e
        data = data.get("geometry", data) if isinstance(data, dict) else data
        missing = [k for k in ("sdd_mm", "rows", "cols", "pixel_mm", "principal_point_px", "world_to_camera")
                   if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"not a projection geometry: missing {', '.join(missing)}")
        return cls.from_dict(data)

    # -- rays and projection ------------------------------------------------------------------
    def pixel_centers_camera(self) -> np.ndarray:
        """Camera coordinates of every pixel centre, shape (rows, cols, 3)."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        (pr, pc), (sr, sc) = self.principal_point_px, self.pixel_mm
        return np.stack([(c - pc) * sc, (r - pr) * sr, np.full(r.shape, float(self.sdd_mm))], -1)

    def source_world(self) -> np.ndarray:
        """The X-ray source in world coordinates."""
        return np.linalg.inv(self.world_to_camera)[:3, 3]

    def project(self, points_world: np.ndarray) -> np.ndarray:
        """(row, col) detector coordinates (fractional pixels) of world points, shape (..., 2)."""
        p = apply(self.world_to_camera, np.asarray(points_world, float))
        u = p[..., :2] * (self.sdd_mm / p[..., 2:3])
        (pr, pc), (sr, sc) = self.principal_point_px, self.pixel_mm
        return np.stack([u[..., 1] / sr + pr, u[..., 0] / sc + pc], -1)


def ap_pose(center_world, source_to_center_mm: float, rotvec_deg=(0, 0, 0), shift_mm=(0, 0, 0)) -> np.ndarray:
    """Pose of an AP radiograph whose central ray passes through ``center_world``.

    Args:
        center_world: The world point (LPS mm) placed on the central ray.
        source_to_center_mm: Its distance from the source.
        rotvec_deg: A rotation of the patient about ``center_world`` (rotation vector in degrees, in
            camera axes), e.g. pelvic tilt (about x) or rotation about the long axis (about y).
        shift_mm: A shift of the patient in camera axes (mm), applied last.
    """
    r = Rotation.from_rotvec(np.asarray(rotvec_deg, float), degrees=True).as_matrix()
    return (translation(np.asarray(shift_mm, float) + [0, 0, source_to_center_mm])
            @ rigid(r) @ rigid(AP_ROTATION) @ translation(-np.asarray(center_world, float)))
