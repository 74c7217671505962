"""DiffDRR (``diffdrr==0.6.1``, MIT) as a peer renderer at exactly our projection geometry.

DiffDRR is not a dependency of ``bonedrr``; install it for benchmarks only (its wheel declares
torchvision, which must not replace our CPU torch)::

    pip install --no-deps diffdrr==0.6.1
    pip install torchio==1.2.1 fastcore==2.2.41 einops==0.8.2 pandas==3.1.1

Mapping between our conventions (``bonedrr.geometry``) and DiffDRR's, as implemented here (see also
``docs/diffdrr_mapping.md``):

* World. Ours: LPS mm, voxel index (i, j, k) -> world by ``index_to_world(grid)``. DiffDRR's: RAS mm,
  voxel index -> world by the torchio affine of ``subject.density``; ``diffdrr.data.read(...,
  center_volume=True)`` then shifts that world so that the centre of the volume (index (n - 1) / 2)
  is at the origin. We hand ``read`` a torchio image whose affine is
  ``diag(-1, -1, 1, 1) @ index_to_world(padded grid)``, so arbitrary direction cosines carry over.
  After ``read``, ``W = index_to_world(padded) @ inv(subject.density.affine)`` (rigid) takes DiffDRR's
  world to ours.
* Arrays. Ours: NumPy [k, j, i]. DiffDRR/torchio: tensor (1, i, j, k), so we transpose.
* Camera. DiffDRR's detector, before its pose, has the source at the origin and the detector plane at
  z = sdd, like ours, but its row index grows with -y and (with ``reverse_x_axis=True``, its default)
  its column index with -x. That frame is ours turned 180 degrees about the central ray:
  ``F = diag(-1, -1, 1, 1)`` maps DiffDRR's detector frame to our camera frame, and with it DiffDRR's
  pixel (row, col) is our pixel (row, col): no image flip.
* Principal point. DiffDRR centres its detector on the central ray and offsets it by (x0, y0) mm in
  its own frame: ``x0 = (pc - (cols - 1) / 2) * pixel_mm[1]``, ``y0 = (pr - (rows - 1) / 2) *
  pixel_mm[0]``. ``delx`` = column spacing, ``dely`` = row spacing, ``height`` = rows, ``width`` =
  cols.
* Pose. DiffDRR's pose (``RigidTransform``; what ``diffdrr.pose.convert`` returns) maps its detector
  frame to its world (camera-to-world, despite the "world2camera" wording in its source), composed
  after ``subject.reorient``: rays = ``pose @ reorient @ detector points``. We read with
  ``orientation=None`` (reorient = identity) and pass
  ``pose = inv(W) @ inv(world_to_camera) @ F`` as a 4x4 matrix.
* Units. DiffDRR integrates ``subject.density`` over millimetres; we render our density in g/cm3
  (replacing the 0..1 HU mapping ``read`` makes) and divide by 10 to get g/cm2.
* Where the volume ends. Siddon treats voxels as constant cells (nearest-voxel look-up unless
  ``mode="bilinear"`` is passed) ending half a voxel past the edge voxel centres; trilinear uses
  ``grid_sample`` with zero padding, so the volume falls linearly to zero one voxel past the edge
  centres, but it samples only between DiffDRR's approximate box entry and exit. Our reference
  projector falls to zero half a voxel past them. Zero-padding the volume by ``pad_voxels``
  (default 2) makes the trilinear renderers agree exactly at the edges and adds nothing to Siddon's.
* 2D points. ``DRR.perspective_projection`` returns (x, y) = (col + 0.5, row + 0.5) of our pixels.
* Labels. ``mask_to_channels=True`` splits each ray's integral by the (nearest-neighbour) label of
  every sample; the channel index is the label value. We remap labels to 0..n-1 (sorted label ids,
  0 always included) so that sparse ids (e.g. TotalSegmentator's) do not create empty channels.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from bonedrr.geometry import Geometry, check_rigid, translation
from bonedrr.images import index_to_world

#: Flips x and y: LPS <-> RAS, and DiffDRR's detector frame -> our camera frame (both proper rotations).
FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


class DiffDRRPeer:
    """A DiffDRR ``DRR`` module set up once for a volume and a detector, rendered at any pose.

    Args:
        density: Density in g/cm3, indexed [k, j, i] on ``grid``.
        grid: The image whose origin, spacing and direction place ``density`` in the world (LPS).
        geometry: Detector (sdd, rows, cols, pixel size, principal point) and default pose.
        renderer: DiffDRR's ``"siddon"`` or ``"trilinear"``.
        labels: Optional integer label volume [k, j, i] on ``grid``; if given, :meth:`render` returns
            one channel per label id in :attr:`label_ids`.
        pad_voxels: Zero voxels added on every side of the volume (see the module docstring).
        device: Torch device to render on.
        **drr_kwargs: Passed to ``diffdrr.drr.DRR`` (e.g. ``patch_size`` to bound memory).

    Attributes:
        drr: The ``diffdrr.drr.DRR`` module.
        label_ids: Label ids in channel order (``labels`` given), else None.
        world_from_diffdrr: Rigid 4x4 taking DiffDRR's world (RAS, centred) to ours (LPS).
    """

    def __init__(self, density: np.ndarray, grid: sitk.Image, geometry: Geometry, renderer: str = "siddon",
                 labels: np.ndarray | None = None, pad_voxels: int = 2, device="cpu", **drr_kwargs):
        from diffdrr.data import read  # imported here: DiffDRR is an optional, benchmark-only peer
        from diffdrr.drr import DRR
        from torchio import LabelMap, ScalarImage

        density = np.asarray(density)
        if density.shape != tuple(grid.GetSize())[::-1]:
            raise ValueError(f"density shape {density.shape} is not grid size {grid.GetSize()} reversed")
        p = int(pad_voxels)
        index_to_world_padded = index_to_world(grid) @ translation([-p, -p, -p])
        affine_ras = FLIP_XY @ index_to_world_padded

        def to_torchio(array):  # [k, j, i] -> (1, i, j, k), zero-padded
            return torch.from_numpy(np.ascontiguousarray(np.pad(array, p).transpose(2, 1, 0)[None]))

        volume = ScalarImage(tensor=to_torchio(density.astype(np.float32)), affine=affine_ras)
        labelmap, self.label_ids = None, None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != density.shape:
                raise ValueError(f"labels shape {labels.shape} differs from density shape {density.shape}")
            ids = np.union1d(labels, [0])  # sorted ids; the padding (label 0) needs a channel too
            self.label_ids = [int(v) for v in ids]
            labelmap = LabelMap(tensor=to_torchio(np.searchsorted(ids, labels).astype(np.int64)), affine=affine_ras)

        subject = read(volume, labelmap, orientation=None, center_volume=True)
        # read() replaced our values by its own 0..1 mapping of HU; render our density (g/cm3) instead.
        subject.density.set_data(volume.data.clone())
        self.world_from_diffdrr = index_to_world_padded @ np.linalg.inv(np.asarray(subject.density.affine, float))

        (pr, pc), (sr, sc) = geometry.principal_point_px, geometry.pixel_mm
        self.drr = DRR(subject, sdd=geometry.sdd_mm, height=geometry.rows, delx=sc, width=geometry.cols, dely=sr,
                       x0=(pc - (geometry.cols - 1) / 2) * sc, y0=(pr - (geometry.rows - 1) / 2) * sr,
                       renderer=renderer, reverse_x_axis=True, **drr_kwargs).to(device)
        self.geometry = geometry

    def pose(self, world_to_camera: np.ndarray | None = None) -> np.ndarray:
        """DiffDRR's pose (its detector frame -> its world, 4x4) for our ``world_to_camera``."""
        w2c = self.geometry.world_to_camera if world_to_camera is None else check_rigid(world_to_camera)
        return np.linalg.inv(self.world_from_diffdrr) @ np.linalg.inv(w2c) @ FLIP_XY

    @torch.no_grad()
    def render(self, world_to_camera: np.ndarray | None = None, **render_kwargs) -> np.ndarray:
        """Render at ``world_to_camera`` (default: the geometry's pose).

        Args:
            world_to_camera: Rigid 4x4, our world (LPS mm) to our camera.
            **render_kwargs: Passed to DiffDRR's renderer (e.g. ``n_points`` for trilinear).

        Returns:
            float64 g/cm2 on our pixel grid: (rows, cols), or (len(label_ids), rows, cols) with labels.
        """
        from diffdrr.pose import RigidTransform

        pose = torch.as_tensor(self.pose(world_to_camera)[None], dtype=self.drr.dtype, device=self.drr.device)
        img = self.drr(RigidTransform(pose), mask_to_channels=self.label_ids is not None, **render_kwargs)
        # DiffDRR makes max(label) + 1 channels: with our compact labels, exactly one per label id.
        img = img[0].double().cpu().numpy() / 10.0  # mm * g/cm3 -> g/cm2
        return img[0] if self.label_ids is None else img


def diffdrr_drr(density: np.ndarray, grid: sitk.Image, geometry: Geometry, renderer: str = "siddon",
                labels: np.ndarray | None = None, pad_voxels: int = 2, device="cpu",
                **drr_kwargs) -> np.ndarray | tuple[np.ndarray, list[int]]:
    """One DiffDRR render of ``density`` at ``geometry`` (see :class:`DiffDRRPeer`).

    Args:
        density: Density in g/cm3, indexed [k, j, i] on ``grid`` (any direction cosines).
        grid: The image placing ``density`` in the world (LPS mm).
        geometry: Our camera and pose.
        renderer: ``"siddon"`` or ``"trilinear"``.
        labels: Optional integer labels [k, j, i] on ``grid`` to split the integral by structure.
        pad_voxels: Zero voxels added on every side before rendering.
        device: Torch device.
        **drr_kwargs: Passed to ``diffdrr.drr.DRR``, e.g. ``mode="bilinear"`` for Siddon with
            trilinear voxel look-ups instead of its default nearest voxel, or ``patch_size``.

    Returns:
        Without ``labels``: float64 (rows, cols) line integrals in g/cm2 on our pixel grid. With
        ``labels``: ``(channels, label_ids)``, channels float64 (len(label_ids), rows, cols), where
        ``label_ids`` lists the label values present (0 always included), ascending, in channel
        order.
    """
    peer = DiffDRRPeer(density, grid, geometry, renderer, labels, pad_voxels, device, **drr_kwargs)
    img = peer.render()
    return img if labels is None else (img, peer.label_ids)
