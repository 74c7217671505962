"""Where the predicted DRR-vBMD's error against QCT comes from: the proximal femur, or its thickness.

``bonedrr validate`` reads QCT vBMD from DRR-vBMD (:func:`bonedrr.bmd.drr_vbmd`): the proximal-femur
channel's sum over its projected bone area over the thickness channel's sum there. Its error is the
areal density's error and the thickness's. For each run (a folder of fold models ``*_fold<k>``, each
reading the hips of the fold it held out) this benchmark measures, pooled over the held-out hips:

- r of the predicted DRR-BMD against the true, and of the predicted DRR-vBMD against QCT vBMD and
  against the true DRR-vBMD (raw, without ``validate``'s per-fold line: on the 80-patient raw cohort
  the line moves the pooled r by under 0.001);
- the mean thickness over the projected bone (cm; 1000 DRR-BMD / DRR-vBMD): r of the predicted
  against the true, and the SD of each (a prediction pulled to the cohort's mean has a smaller SD);
  and, of the truth, r of the thickness against the square root of the projected bone's area;
- substitutions: the predicted proximal femur with the true thickness, and the true proximal femur
  with the predicted thickness, each against QCT (which of the two a better model would gain most from);
- test-time shift averaging: the mean of the predictions of the crop shifted by -s, 0 and +s pixels
  along each axis (9 crops; each prediction shifted back), against the unshifted prediction (whether
  the error is noise an average removes, or a bias it keeps);

and for each pair of runs A, B: A's proximal femur with B's thickness, and the mean of A's and B's
predictions (a two-model ensemble).

Run (the shards of a cohort and one or more runs' model folders, each NAME=FOLDER):
    python benchmarks/vbmd_error_sources.py --shards results/demo/shards \\
        --run stage2=results/models
Writes benchmarks/results/vbmd_error_sources.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np

from bonedrr.bmd import BMD_CHANNEL, THICKNESS_CHANNEL, drr_bmd, drr_vbmd
from bonedrr.dataset import ShardDataset
from bonedrr.estimate import load_for_inference
from bonedrr.validate import fold_of_model, load_samples, predicted_bmd

REPO = Path(__file__).resolve().parents[1]


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``images`` (..., H, W) moved by (dy, dx) pixels, the edge rows and columns repeated into the gap."""
    pad = [(0, 0)] * (images.ndim - 2) + [(abs(dy), abs(dy)), (abs(dx), abs(dx))]
    padded = np.pad(images, pad, mode="edge")
    h, w = images.shape[-2:]
    return padded[..., abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def readouts(pf: np.ndarray, thickness: np.ndarray, threshold: float) -> dict:
    """DRR-BMD (g/cm2), DRR-vBMD (mg/cm3) and mean thickness (cm) of each hip's two channels (N, H, W)."""
    bmd = np.array([drr_bmd(p, threshold) for p in pf])
    vbmd = np.array([drr_vbmd(p, t, threshold) for p, t in zip(pf, thickness)])
    return {"drr_bmd": bmd, "drr_vbmd": vbmd, "thickness_cm": 1000.0 * bmd / vbmd}


def r(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    return round(float(np.corrcoef(x[ok], y[ok])[0, 1]), 4)


def fold_models(folder: Path) -> list[Path]:
    models = sorted(p for p in folder.iterdir() if re.search(r"fold\d+$", p.name) and (p / "model.pt").is_file())
    if not models:
        raise SystemExit(f"{folder}: no fold model folders (..._fold<k> with a model.pt)")
    return models


def predict_run(folder: Path, data: dict, threshold: float, shift: int) -> dict:
    """The two channels of each hip, predicted by the model that held its fold out: unshifted, and
    averaged over the 9 shifted crops."""
    n, (h, w) = len(data["xray"]), data["xray"].shape[1:]
    out = {key: np.full((n, h, w), np.nan, np.float32) for key in ("pf", "thickness", "pf_shifts", "thickness_shifts")}
    fold = np.asarray(data["fold"])
    for model_dir in fold_models(folder):
        model = load_for_inference(model_dir)
        held = fold == fold_of_model(model_dir)
        k, t = model.channels.index(BMD_CHANNEL), model.channels.index(THICKNESS_CHANNEL)
        xray, overview, kvp = data["xray"][held], data["overview"][held], data["kvp"][held]
        sums = np.zeros((held.sum(), 2, h, w))
        for dy, dx in itertools.product((-shift, 0, shift), repeat=2):
            _, pred = predicted_bmd(model, shifted(xray, dy, dx), threshold, overview, kvp)
            pred = shifted(pred[:, [k, t]], -dy, -dx)
            sums += pred
            if dy == dx == 0:
                out["pf"][held], out["thickness"][held] = pred[:, 0], pred[:, 1]
        out["pf_shifts"][held], out["thickness_shifts"][held] = sums[:, 0] / 9, sums[:, 1] / 9
        print(model_dir, "done", flush=True)
    return out


def scores(read: dict, truth: dict, qct: np.ndarray) -> dict:
    return {"r_drr_bmd": r(read["drr_bmd"], truth["drr_bmd"]), "r_qct_from_drr_vbmd": r(read["drr_vbmd"], qct),
            "r_true_drr_vbmd": r(read["drr_vbmd"], truth["drr_vbmd"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--run", required=True, nargs="+", metavar="NAME=FOLDER",
                    help="a run's name and the folder of its fold models (..._fold<k>)")
    ap.add_argument("--threshold", type=float, default=0.05, help="the BMD threshold, g/cm2")
    ap.add_argument("--shift", type=int, default=2, help="test-time shift, pixels of the crop")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vbmd_error_sources.json")
    args = ap.parse_args()

    t0 = time.time()
    runs = dict(item.split("=", 1) for item in args.run)
    data = load_samples(ShardDataset(args.shards))
    channels = data["channels"]
    qct = np.asarray(data["qct_vbmd"], float)
    true_pf = data["drr"][:, channels.index(BMD_CHANNEL)]
    truth = readouts(true_pf, data["drr"][:, channels.index(THICKNESS_CHANNEL)], args.threshold)
    area = (true_pf > args.threshold).sum((1, 2)).astype(float)
    result = {"command": "python benchmarks/vbmd_error_sources.py --shards {} --run {} --threshold {} --shift {}".format(
        args.shards, " ".join(args.run), args.threshold, args.shift), "hips": len(qct),
        "truth": {"r_qct_from_true_drr_vbmd": r(truth["drr_vbmd"], qct), "r_qct_from_true_drr_bmd": r(truth["drr_bmd"], qct),
                  "thickness_cm_mean": round(float(np.nanmean(truth["thickness_cm"])), 3),
                  "thickness_cm_sd": round(float(np.nanstd(truth["thickness_cm"])), 3),
                  # does the bone's size on the radiograph tell its depth along the beam?
                  "r_thickness_vs_sqrt_projected_area": r(truth["thickness_cm"], np.sqrt(area))},
        "runs": {}, "pairs": {}}
    predicted = {}
    for name, folder in runs.items():
        p = predicted[name] = predict_run(Path(folder), data, args.threshold, args.shift)
        read = readouts(p["pf"], p["thickness"], args.threshold)
        entry = {"folder": folder, **scores(read, truth, qct),
                 "thickness": {"r_true": r(read["thickness_cm"], truth["thickness_cm"]),
                               "sd_cm": round(float(np.nanstd(read["thickness_cm"])), 3)},
                 "r_qct_predicted_pf_true_thickness": r(1000.0 * read["drr_bmd"] / truth["thickness_cm"], qct),
                 "r_qct_true_pf_predicted_thickness": r(1000.0 * truth["drr_bmd"] / read["thickness_cm"], qct),
                 "shift_averaged": scores(readouts(p["pf_shifts"], p["thickness_shifts"], args.threshold), truth, qct)}
        result["runs"][name] = entry
        print(name, json.dumps(entry), flush=True)
    for a, b in itertools.permutations(predicted, 2):
        pa, pb = predicted[a], predicted[b]
        entry = {"pf_of_a_thickness_of_b": scores(readouts(pa["pf"], pb["thickness"], args.threshold), truth, qct)}
        if a < b:
            entry["mean_of_both"] = scores(readouts((pa["pf"] + pb["pf"]) / 2, (pa["thickness"] + pb["thickness"]) / 2,
                                                    args.threshold), truth, qct)
        result["pairs"][f"{a}+{b}"] = entry
        print(a, b, json.dumps(entry), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
