"""What the multi-pose sweep's BMD changes follow: the pose, or the radiograph's exposure and processing.

For every demo patient with extra views, each cross-validation model (the one that never saw the
patient) reads BMD off each of the patient's radiographs at the true hip centres, as the validation's
pose sweep does (:func:`bonedrr.validate.pose_sweep`). Each value's relative deviation from its hip's
mean is correlated with the same radiograph's deviation in each simulation parameter the demo knows
(``truth.json`` and ``views/views.json``): the pose (rotation about each axis, magnification) and the
exposure and processing (kVp, scatter, quantum noise, blur, window, tone curve, unsharp masking). A
least-squares fit on all of them says how much of the spread they explain together. The true DRR-BMD at
each pose (:func:`bonedrr.validate.true_drr_bmd_by_pose`) is the truth's own share.

Run:
    python benchmarks/pose_drivers.py --shards results/demo/shards --models results/models/demo_fold* \\
        --demo-root results/demo/demo_input --cases-root results/demo
Writes benchmarks/results/pose_drivers.json.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import time
from pathlib import Path

import numpy as np

from bonedrr import validate as v
from bonedrr.train import load_model

REPO = Path(__file__).resolve().parents[1]
EXPOSURE = ("kvp", "scatter_to_primary", "photons_per_pixel", "blur_px", "window_low_pct", "window_high_pct", "gamma",
            "unsharp_amount", "unsharp_sigma_mm")
POSE = ("rotation_x_deg", "rotation_y_deg", "rotation_z_deg", "magnification")


def parameters(demo_case: Path) -> list[dict]:
    """Each radiograph's simulation parameters, in :func:`bonedrr.validate._radiographs_of` order."""
    truth = json.loads((demo_case / "truth.json").read_text())
    views = json.loads((demo_case / "views" / "views.json").read_text())["views"]
    records = [(truth["exposure"], truth["patient"]["pose_rotvec_deg"], truth["geometry"]["sdd_mm"],
                truth["source_to_centre_mm"])]
    records += [(w["exposure"], w["pose_rotvec_deg"], w["geometry"]["sdd_mm"], w["source_to_centre_mm"]) for w in views]
    return [{**{k: float(e[k]) for k in EXPOSURE}, "rotation_x_deg": r[0], "rotation_y_deg": r[1],
             "rotation_z_deg": r[2], "magnification": sdd / stc} for e, r, sdd, stc in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--models", required=True, type=Path, nargs="+", help="folders <cohort>_fold<k>")
    ap.add_argument("--demo-root", required=True, type=Path)
    ap.add_argument("--cases-root", type=Path, help="results/<cohort>: adds the true DRR-BMD at each pose")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pose_drivers.json")
    args = ap.parse_args()

    with open(args.shards / "index.csv") as f:
        fold_of = {r["case_id"]: int(r["fold"]) for r in csv.DictReader(f)}
    pack = v._pack_settings(args.shards)
    models = {v.fold_of_model(m): m for m in args.models}
    rows = []
    for case, fold in sorted(fold_of.items()):
        demo_case = args.demo_root / case
        if fold not in models or not (demo_case / "views" / "views.json").is_file():
            continue
        model = load_model(models[fold])
        found = v.pose_sweep(model, [(case, demo_case)], pack, (1.4, 1.4), 0.05, args.cases_root)
        params = parameters(demo_case)
        rows += [{**r, **params[r["radiograph"]]} for r in found]

    hips = collections.defaultdict(list)
    for r in rows:
        hips[(r["case_id"], r["side"])].append(r)
    deviation, truth_deviation, centred = [], [], collections.defaultdict(list)
    for group in hips.values():
        values = np.array([r["bmd_true_hips"] for r in group])
        deviation += list(values / values.mean() - 1)
        if all("true_drr_bmd" in r for r in group):
            t = np.array([r["true_drr_bmd"] for r in group])
            truth_deviation += list(t / t.mean() - 1)
        for k in EXPOSURE + POSE:
            mean = np.mean([r[k] for r in group])
            centred[k] += [r[k] - mean for r in group]
    deviation = np.array(deviation)
    design = np.column_stack([centred[k] for k in EXPOSURE + POSE])
    coef, *_ = np.linalg.lstsq(design, deviation, rcond=None)
    explained = 1 - np.var(deviation - design @ coef) / np.var(deviation)
    expo = np.column_stack([centred[k] for k in EXPOSURE])
    coef_e, *_ = np.linalg.lstsq(expo, deviation, rcond=None)
    pose = np.column_stack([centred[k] for k in POSE])
    coef_p, *_ = np.linalg.lstsq(pose, deviation, rcond=None)
    results = {
        "what": "relative deviation of the predicted DRR-BMD (true hip centres) from its hip's mean over the hip's "
                "radiographs, against each radiograph's simulation parameters (centred per hip)",
        "models": [m.name for m in args.models], "hips": len(hips), "radiographs": len(rows),
        "rms_deviation_predicted": float(np.sqrt(np.mean(deviation ** 2))),
        "rms_deviation_true_drr_bmd": float(np.sqrt(np.mean(np.square(truth_deviation)))) if truth_deviation else None,
        "pearson_r_with_deviation": {k: float(np.corrcoef(centred[k], deviation)[0, 1]) for k in EXPOSURE + POSE},
        "variance_explained": {"all": float(explained),
                               "exposure_and_processing": float(1 - np.var(deviation - expo @ coef_e) / np.var(deviation)),
                               "pose": float(1 - np.var(deviation - pose @ coef_p) / np.var(deviation))},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("rms_deviation_predicted", "rms_deviation_true_drr_bmd",
                                              "pearson_r_with_deviation", "variance_explained")}, indent=2))


if __name__ == "__main__":
    main()
