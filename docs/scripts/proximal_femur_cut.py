"""Draw docs/images/proximal_femur_cut.png: the proximal femur (the BMD region) on the demo template.

    PYTHONPATH=src python docs/scripts/proximal_femur_cut.py [--cut-mm 80]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk

from bonedrr.demo.virtual_patient import load_template
from bonedrr.images import world_axis_grid
from bonedrr.labels import CANONICAL_LABELS, proximal_femur_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut-mm", type=float, default=80.0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "images" / "proximal_femur_cut.png"))
    args = parser.parse_args()
    t = load_template()
    grid = t.grid
    z = world_axis_grid(grid, 2)
    hu = t.true_hu()
    # Coronal view in LPS index order: rows superior (top) to inferior, columns patient right to left.
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.CopyInformation(grid)
    order = sitk.DICOMOrient(image, "LPS")
    sx, _, sz = order.GetSpacing()

    def coronal(a, j=None):
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.CopyInformation(grid)
        arr = sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))
        return arr, arr[::-1, j if j is not None else arr.shape[1] // 2, :]

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, side in zip(axes, ("right", "left")):
        femur = t.labels == CANONICAL_LABELS[f"femur_{side}"]
        proximal = proximal_femur_mask(t.labels, side, z, args.cut_mm)
        farr, _ = coronal(femur)
        j = int(np.argmax(farr.sum(axis=(0, 2))))  # the coronal slice through most of the femur
        _, ct2 = coronal(hu, j)
        _, f2 = coronal(femur, j)
        _, p2 = coronal(proximal, j)
        zarr, _ = coronal(np.broadcast_to(z, hu.shape))
        top = float(np.broadcast_to(z, hu.shape)[femur].max())
        zcol = zarr[::-1, j, 0]
        ax.imshow(ct2, cmap="gray", vmin=-250, vmax=1250, aspect=sz / sx)
        ax.contour(f2 > 0, levels=[0.5], colors="#377eb8", linewidths=1.0)
        ax.imshow(np.ma.masked_where(p2 == 0, p2), cmap="autumn", alpha=0.55, aspect=sz / sx)
        for level, text in ((top, "top of the femoral head"), (top - args.cut_mm, f"cut: {args.cut_mm:g} mm below")):
            row = float(np.interp(-level, -zcol, np.arange(len(zcol))))
            ax.axhline(row, color="w", ls="--", lw=0.8)
            ax.text(2, row - 2, text, color="w", fontsize=8)
        ax.set_title(f"femur_{side}: proximal_femur_{side} in red, femur outline blue", fontsize=10)
        ax.axis("off")
    fig.suptitle("The proximal femur (BMD region): femur voxels within proximal_femur_cut_mm "
                 f"({args.cut_mm:g} mm) below the head's top\n(bonedrr.labels.proximal_femur_mask; demo template, "
                 "coronal, patient right on the left)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
