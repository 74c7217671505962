"""What a fold model's BMD error follows, and where its bias comes from.

For each model (a ``bonedrr train --hold-out K`` folder) and a demo cohort's shards with its case
folders (``truth.json``: every random draw of the radiograph and the patient), on the held-out hips and
on the training hips apart:

* r, MAE and bias of the predicted DRR-BMD against the true one, and the slope of a line fitted to
  them (below 1: the model shrinks towards the cohort's mean);
* the same read over the TRUE bone mask instead of the predicted one, and the predicted mask's area over
  the true one's: what of the bias the read-out's threshold makes (a soft edge enlarges the area and its
  faint rim lowers the mean);
* the correlation of the relative error with each exposure, processing and patient draw, and the share
  of its variance that all of them explain linearly.

Run (the shards and case folders of ``benchmarks/truth_pose_cohort.sh`` or of the workflow's demo):
    python benchmarks/error_drivers.py --shards OUT/shards --demo-root OUT/demo_input \\
        --models MODELS/fold0 [...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bonedrr.bmd import drr_bmd
from bonedrr.dataset import ShardDataset
from bonedrr.model.portable import load_portable
from bonedrr.validate import fold_of_model, load_samples

EXPOSURE = ("kvp", "al_mm", "photons_per_pixel", "scatter_to_primary", "blur_px", "window_low_pct",
            "window_high_pct", "gamma", "unsharp_amount", "unsharp_sigma_mm")
PATIENT = ("body_scale", "layer_mm", "layer_fat_fraction", "bone_factor")


def draws(truth: dict) -> dict[str, float]:
    out = {k: float(truth["exposure"][k]) for k in EXPOSURE}
    out.update({k: float(np.mean(truth["patient"][k])) for k in PATIENT})
    return out


def summarise(pred, true, pred_on_mask, true_on_mask, area_ratio, rel, table) -> dict:
    x = np.column_stack([np.ones(len(rel))] + [table[k] for k in table])
    beta, *_ = np.linalg.lstsq(x, rel, rcond=None)
    return {"hips": int(len(pred)), "r": float(np.corrcoef(pred, true)[0, 1]), "mae": float(np.abs(pred - true).mean()),
            "bias": float((pred - true).mean()), "slope": float(np.polyfit(true, pred, 1)[0]),
            "on_true_mask": {"bias": float((pred_on_mask - true_on_mask).mean()),
                             "slope": float(np.polyfit(true_on_mask, pred_on_mask, 1)[0])},
            "predicted_area_over_true": float(area_ratio.mean()),
            "relative_error_r": {k: float(np.corrcoef(v, rel)[0, 1]) for k, v in table.items()},
            "relative_error_sd": float(rel.std()),
            "variance_explained_by_all_draws": float(1 - np.var(rel - x @ beta) / np.var(rel))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--demo-root", required=True, type=Path, help="the case folders (truth.json)")
    ap.add_argument("--models", required=True, type=Path, nargs="+",
                    help="fold model folders, named ..._fold<k> or fold<k> (k: the held-out fold)")
    ap.add_argument("--threshold", type=float, default=0.05, help="the BMD threshold, g/cm2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    data = load_samples(ShardDataset(args.shards))
    k = data["channels"].index("proximal_femur")
    true_drr = data["drr"][:, k]
    mask = true_drr > args.threshold
    truth = {c: draws(json.loads((args.demo_root / c / "truth.json").read_text())) for c in set(data["case_id"])}
    table = {name: np.array([truth[c][name] for c in data["case_id"]]) for name in EXPOSURE + PATIENT}
    fold = np.array(data["fold"])
    result = {}
    for model_dir in args.models:
        model = load_portable(model_dir / "model.npz")
        held_fold = fold_of_model(model_dir)
        pred_drr = model.predict(data["xray"], model.scale_of(data["overview"]), kvp=data["kvp"])
        pred_drr = pred_drr[:, model.channels.index("proximal_femur")]
        pred = np.array([drr_bmd(p, args.threshold) for p in pred_drr])
        on_mask = np.array([p[m].mean() for p, m in zip(pred_drr, mask)])
        true_on_mask = np.array([t[m].mean() for t, m in zip(true_drr, mask)])
        area = (pred_drr > args.threshold).sum((1, 2)) / mask.sum((1, 2))
        rel = (pred - data["drr_bmd"]) / data["drr_bmd"]
        result[str(model_dir)] = {
            name: summarise(pred[sel], data["drr_bmd"][sel], on_mask[sel], true_on_mask[sel], area[sel], rel[sel],
                            {key: v[sel] for key, v in table.items()})
            for name, sel in (("held_out", fold == held_fold), ("training", fold != held_fold))}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
