"""2D/3D registration accuracy and time, from random starts.

1. The demo cohort (its radiographs simulated with physics the pipeline does not use): each case
   registered from ``--starts`` starting poses offset from the truth by up to 20 mm and 10 degrees.
2. The real CT (``../shared/data/totalseg-example`` or the vendored copy): radiographs rendered by
   another renderer (DiffDRR 0.6.1, trilinear, of the whole body's density) at random AP poses,
   registered from starts offset likewise.

Errors over the bone voxels: mPD (mean reprojection distance at the isocentre, mm), rotation error
(degrees), mTRE (mm) with its depth part. Success: mPD < 0.5 mm and rotation error < 1 degree.
A failure is "flagged" when its QA flags are raised (a silent failure is one that is not).

3. Side by side with elastix's own 2D/3D registration (``peers/elastix_peer.py``: RayCastInterpolator,
   NormalizedGradientCorrelation, Powell, detector levels 64/128/256) from the same starts on the
   first ``--elastix`` demo cases (CT in HU as elastix wants it; ours on the calibrated bones).

Run (the real-CT part needs DiffDRR, the side-by-side part itk-elastix; see benchmarks/README.md):
    python benchmarks/register.py [--cases 8] [--starts 2] [--real 5] [--elastix 4]
    python benchmarks/register.py --only-elastix 4     # add the side-by-side part to register.json
Writes benchmarks/results/register.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bonedrr.geometry import Geometry, ap_pose  # noqa: E402
from bonedrr.images import index_to_world  # noqa: E402
from bonedrr.labels import PRESETS, remap  # noqa: E402
from bonedrr.register import (Registration, bone_points, perturb, reprojection_distance_mm,  # noqa: E402
                              rotation_error_deg, target_registration_error_mm)

SHARED = REPO.parent / "shared" / "data" / "totalseg-example"
DATA = SHARED if SHARED.is_dir() else REPO / "resources" / "totalseg_example"


def random_offset(rng) -> np.ndarray:
    """Up to 10 degrees (rotation vector norm) and 20 mm (translation norm), uniform directions."""
    axis, shift = rng.normal(size=3), rng.normal(size=3)
    return np.concatenate([axis / np.linalg.norm(axis) * rng.uniform(0, 10),
                           shift / np.linalg.norm(shift) * rng.uniform(0, 20)])


def evaluate(reg: Registration, truth: Geometry, start: np.ndarray, points: np.ndarray) -> dict:
    t = time.perf_counter()
    reg.evaluations = 0
    result = reg.run(start)
    pose = np.asarray(result["world_to_camera"])
    mpd = reprojection_distance_mm(pose, truth.world_to_camera, truth, points)
    rot = rotation_error_deg(pose, truth.world_to_camera)
    tre = target_registration_error_mm(pose, truth.world_to_camera, points)
    return {"start_mpd_mm": round(reprojection_distance_mm(start, truth.world_to_camera, truth, points), 2),
            "mpd_mm": round(mpd, 3), "rotation_error_deg": round(rot, 3), "mtre_mm": round(tre["mtre_mm"], 3),
            "depth_error_mm": round(tre["mean_depth_error_mm"], 3), "success": bool(mpd < 0.5 and rot < 1.0),
            "flagged": not result["converged"], "qa_flags": result["qa_flags"],
            "seconds": round(time.perf_counter() - t, 1), "drrs": result["evaluations"]}


def demo_case(case: Path):
    """A registered demo case's true geometry, radiograph, a Registration of it, and its bone points."""
    truth = Geometry.from_dict(json.loads((case.parent / "demo_input" / case.name / "truth.json").read_text())[
        "geometry"])
    density = sitk.ReadImage(str(case / "density.nii.gz"), sitk.sitkFloat32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nii.gz")))
    xray = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "xray.nii.gz")))
    reg = Registration(sitk.GetArrayFromImage(density), labels, index_to_world(density), xray, truth, 900.0,
                       device="cpu")
    return truth, xray, reg, bone_points(labels, index_to_world(density))


def summary(runs: list[dict]) -> dict:
    n = len(runs)
    return {"runs": n, "success_rate": round(sum(r["success"] for r in runs) / n, 3),
            "silent_failures": sum((not r["success"]) and (not r["flagged"]) for r in runs),
            "median_mpd_mm": float(np.median([r["mpd_mm"] for r in runs])),
            "median_rotation_error_deg": float(np.median([r["rotation_error_deg"] for r in runs])),
            "median_mtre_mm": float(np.median([r["mtre_mm"] for r in runs])),
            "median_seconds": float(np.median([r["seconds"] for r in runs]))}


def demo_cohort(n_cases: int, starts: int) -> dict:
    runs = []
    for case in sorted((REPO / "results" / "demo").glob("demo_[0-9]*"))[:n_cases]:
        truth, xray, reg, points = demo_case(case)
        rng = np.random.default_rng(abs(hash(case.name)) % 2**32)
        for s in range(starts):
            start = perturb(truth.world_to_camera, random_offset(rng), reg.centre)
            runs.append({"case": case.name, "start": s, **evaluate(reg, truth, start, points)})
            print(json.dumps(runs[-1]), flush=True)
    return {"summary": summary(runs), "runs": runs}


def real_ct(n_poses: int) -> dict:
    from peers.diffdrr_peer import diffdrr_drr

    ct = sitk.ReadImage(str(DATA / "ct.nii.gz"), sitk.sitkFloat32)
    labels = remap(sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labels.nii.gz"))), PRESETS["totalsegmentator_v2"])
    hu = sitk.GetArrayFromImage(ct)
    density = np.clip(1000.0 + hu, 0, None).astype(np.float32)  # mg/cm3, the whole body for the "radiograph"
    affine = index_to_world(ct)
    points = bone_points(labels, affine)
    rng = np.random.default_rng(7)
    runs = []
    base = Geometry.centered(1100.0, 192, 256, (1.4, 1.4))
    for p in range(n_poses):
        centre = points.mean(0) + rng.uniform(-10, 10, 3)
        truth = base.with_pose(ap_pose(centre, 900.0, rng.uniform(-4, 4, 3), rng.uniform(-8, 8, 3)))
        radiograph = diffdrr_drr(density / 1000.0, ct, truth, renderer="trilinear")  # g/cm2, another renderer
        radiograph = np.log1p(radiograph)  # a display-like monotone mapping
        reg = Registration(density, labels, affine, radiograph, truth, 900.0, device="cpu")
        start = perturb(truth.world_to_camera, random_offset(rng), reg.centre)
        runs.append({"pose": p, **evaluate(reg, truth, start, points)})
        print(json.dumps(runs[-1]), flush=True)
    return {"summary": summary(runs), "runs": runs}


def elastix_side_by_side(n_cases: int) -> dict:
    from peers.elastix_peer import elastix_register

    runs = []
    for case in sorted((REPO / "results" / "demo").glob("demo_[0-9]*"))[:n_cases]:
        truth, xray, reg, points = demo_case(case)
        rng = np.random.default_rng(1000 + len(runs))
        start = perturb(truth.world_to_camera, random_offset(rng), reg.centre)
        ours = evaluate(reg, truth, start, points)
        result = elastix_register(sitk.ReadImage(str(case / "ct.nii.gz"), sitk.sitkFloat32), xray, truth, start,
                                  centre_world=reg.centre)
        pose = np.asarray(result["world_to_camera"])
        mpd = reprojection_distance_mm(pose, truth.world_to_camera, truth, points)
        rot = rotation_error_deg(pose, truth.world_to_camera)
        elastix = {"mpd_mm": round(mpd, 3), "rotation_error_deg": round(rot, 3),
                   "mtre_mm": round(target_registration_error_mm(pose, truth.world_to_camera, points)["mtre_mm"], 3),
                   "success": bool(mpd < 0.5 and rot < 1.0), "seconds": round(result["seconds"], 1)}
        runs.append({"case": case.name, "start_mpd_mm": ours["start_mpd_mm"], "bonedrr": ours, "elastix": elastix})
        print(json.dumps(runs[-1]), flush=True)

    def stats(key):
        return {"success_rate": round(sum(r[key]["success"] for r in runs) / len(runs), 3),
                "median_mpd_mm": float(np.median([r[key]["mpd_mm"] for r in runs])),
                "median_mtre_mm": float(np.median([r[key]["mtre_mm"] for r in runs])),
                "median_seconds": float(np.median([r[key]["seconds"] for r in runs]))}

    return {"summary": {"bonedrr": stats("bonedrr"), "elastix": stats("elastix")}, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--real", type=int, default=5)
    parser.add_argument("--elastix", type=int, default=4)
    parser.add_argument("--only-elastix", type=int, help="add only the side-by-side part to register.json")
    args = parser.parse_args()
    out = REPO / "benchmarks" / "results" / "register.json"
    if args.only_elastix:
        result = json.loads(out.read_text())
        result["elastix_side_by_side"] = elastix_side_by_side(args.only_elastix)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["elastix_side_by_side"]["summary"], indent=2))
        return
    result = {"settings": "bonedrr.register.RegistrationSettings() defaults, CPU, 2 cores",
              "success": "mPD < 0.5 mm and rotation error < 1 degree",
              "demo_cohort": demo_cohort(args.cases, args.starts)}
    if args.real:
        result["real_ct_diffdrr_radiographs"] = real_ct(args.real)
    if args.elastix:
        result["elastix_side_by_side"] = elastix_side_by_side(args.elastix)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["summary"] for k, v in result.items() if isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
