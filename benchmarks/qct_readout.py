"""How much of QCT vBMD a proximal-femur DRR holds beyond its one number, DRR-BMD.

``bonedrr validate`` reads QCT vBMD through a line from DRR-BMD (the mean areal density over the
projected bone) fitted on the training folds; the true DRR-BMD read so is the validation's "ceiling"
against QCT. An areal image holds more than its mean: how the density spreads over the bone (its
quantiles, the profile along the femur) and the bone's size. This benchmark fits QCT vBMD on such
features of the proximal-femur channel, with a ridge regression on the training folds' hips (each
feature standardised on them; ``--ridge`` is its penalty), and reads it off the held-out fold's, for
the true DRR and for each fold model's predicted one, beside the one-number line; with several fold
models, also pooled over their held-out folds (each hip read by the model that held it out).

Since 2026-11-27 ``validate`` reads QCT from DRR-vBMD instead, when the model predicts the proximal
femur's thickness (:func:`bonedrr.bmd.drr_vbmd`: mineral over volume, r 0.995 against QCT from the true
crops on the validation cohort); this benchmark reads the proximal-femur channel alone, as a model
without the thickness has it.

Features (pixels above ``--threshold``, the DRR-BMD threshold): ``mean`` (DRR-BMD itself);
``quantiles`` adds the 10th, 50th and 90th percentiles; ``quantiles_size`` adds the log of the bone's
pixel count and its median width across the crop's rows; ``profile`` adds the 2nd, 5th, 25th, 75th,
95th, 98th and 99.5th percentiles and the mean of each eighth of the crop's rows (along the femur).

Run (a cohort's shards and its fold models, e.g. the truth-pose cohort's):
    python benchmarks/qct_readout.py --shards OUT/shards --models MODELS/fold0 MODELS/fold1
Writes benchmarks/results/qct_readout.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bonedrr.dataset import ShardDataset
from bonedrr.estimate import load_for_inference
from bonedrr.validate import fold_of_model, load_samples, predicted_bmd

REPO = Path(__file__).resolve().parents[1]
FEATURE_SETS = {"mean": 1, "quantiles": 4, "quantiles_size": 6, "profile": 21}


def features(drr: np.ndarray, threshold: float) -> np.ndarray:
    """The 21 features of one proximal-femur DRR (H, W), :data:`FEATURE_SETS` order; NaN without bone."""
    bone = drr > threshold
    if not bone.any():
        return np.full(FEATURE_SETS["profile"], np.nan)
    values = drr[bone]
    width = bone.sum(1)[bone.any(1)]
    eighths = [float(drr[rows][bone[rows]].mean()) if bone[rows].any() else 0.0
               for rows in np.array_split(np.arange(drr.shape[0]), 8)]
    return np.array([values.mean(), *np.percentile(values, [10, 50, 90]), np.log(values.size), np.median(width),
                     *np.percentile(values, [2, 5, 25, 75, 95, 98, 99.5]), *eighths])


def ridge_readout(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, ridge: float) -> np.ndarray:
    """y of the ``test`` rows of x (N, F), from a ridge line fitted on the ``train`` rows."""
    mean, sd = x[train].mean(0), x[train].std(0) + 1e-12
    z = (x - mean) / sd
    coef = np.linalg.solve(z[train].T @ z[train] + ridge * np.eye(x.shape[1]), z[train].T @ (y[train] - y[train].mean()))
    return z[test] @ coef + y[train].mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--models", required=True, type=Path, nargs="+",
                    help="fold model folders, named ..._fold<k> or fold<k> (k: the held-out fold)")
    ap.add_argument("--threshold", type=float, default=0.05, help="the BMD threshold, g/cm2")
    ap.add_argument("--ridge", type=float, default=1.0, help="the ridge penalty on the standardised features")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qct_readout.json")
    args = ap.parse_args()

    t0 = time.time()
    data = load_samples(ShardDataset(args.shards))
    qct = np.asarray(data["qct_vbmd"], float)
    fold = np.asarray(data["fold"])
    k = data["channels"].index("proximal_femur")
    true_features = np.array([features(d, args.threshold) for d in data["drr"][:, k]])
    result = {"command": "python benchmarks/qct_readout.py --shards {} --models {} --threshold {} --ridge {}".format(
        args.shards, " ".join(map(str, args.models)), args.threshold, args.ridge), "models": {}}
    # each hip's read-out by the model that held it out, pooled over the folds as `validate` pools them
    held_out = {(name, source): np.full(len(qct), np.nan) for name in FEATURE_SETS
                for source in ("true_drr", "predicted_drr")}
    for model_dir in args.models:
        model = load_for_inference(model_dir)
        held = fold_of_model(model_dir)
        _, pred = predicted_bmd(model, data["xray"], args.threshold, data["overview"], data["kvp"])
        pred_features = np.array([features(p[model.channels.index("proximal_femur")], args.threshold) for p in pred])
        ok = np.isfinite(qct) & np.isfinite(pred_features).all(1) & np.isfinite(true_features).all(1)
        train, test = ok & (fold != held), ok & (fold == held)
        entry = {"held_out_fold": held, "held_out_hips": int(test.sum()), "training_hips": int(train.sum()),
                 "pearson_r_vs_qct": {}}
        for name, n in FEATURE_SETS.items():
            entry["pearson_r_vs_qct"][name] = {}
            for source, x in (("true_drr", true_features), ("predicted_drr", pred_features)):
                readout = ridge_readout(x[:, :n], qct, train, test, args.ridge)
                held_out[name, source][test] = readout
                entry["pearson_r_vs_qct"][name][source] = round(float(np.corrcoef(readout, qct[test])[0, 1]), 4)
        result["models"][str(model_dir)] = entry
        print(model_dir, json.dumps(entry["pearson_r_vs_qct"]), flush=True)
    if len(args.models) > 1:
        read = np.isfinite(held_out["mean", "true_drr"])
        result["pooled"] = {"held_out_hips": int(read.sum()), "pearson_r_vs_qct": {
            name: {source: round(float(np.corrcoef(held_out[name, source][read], qct[read])[0, 1]), 5)
                   for source in ("true_drr", "predicted_drr")} for name in FEATURE_SETS}}
        print("pooled", json.dumps(result["pooled"]), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
