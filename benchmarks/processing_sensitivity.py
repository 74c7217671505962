"""How much each acquisition and processing parameter moves the predicted BMD, one at a time.

:mod:`benchmarks.pose_drivers` correlates the multi-pose sweep's BMD changes with the radiographs'
parameters, all of which change at once. This is the controlled experiment: for held-out demo patients
of each cross-validation model, the patient is rebuilt (:func:`bonedrr.demo.cohort.draw_patient`) and
projected once at the pose of its own radiograph; then the radiograph is simulated again with one
exposure or processing parameter set to the low end, the middle and the high end of the range the demo
draws it from (:meth:`bonedrr.demo.xray_physics.XrayExposure.random`), the others at the patient's
own values. Each setting is averaged over the same few quantum-noise draws, so the change is the
parameter's and not the noise's. The hips are cut at their true centres, as the pose sweep's
``bmd_true_hips``. Two more rows: the quantum noise alone (the spread over noise draws at the patient's
own settings) and the crop position alone (the crop moved by up to 2 crop pixels, what a locator error
of a few mm does), each as a coefficient of variation.

``span`` is the BMD at the high end minus at the low end, in % of the BMD at the patient's own settings
(signed; mean and RMS over hips); ``sd_if_drawn`` is the standard deviation this would give a hip whose
radiographs draw the parameter uniformly, as the demo does (|span| / sqrt(12), linear assumption). The
truth does not change with any of them (same patient, same pose).

Run:
    python benchmarks/processing_sensitivity.py --shards results/demo/shards \\
        --models results/models/demo_fold0 results/models/demo_fold1 --demo-root results/demo/demo_input
Writes benchmarks/results/processing_sensitivity.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bonedrr import validate as v
from bonedrr.demo.cohort import DemoSettings, draw_patient
from bonedrr.demo.projector import project
from bonedrr.demo.xray_physics import XrayExposure, simulate_radiograph
from bonedrr.estimate import load_for_inference
from bonedrr.geometry import Geometry

REPO = Path(__file__).resolve().parents[1]
#: The ranges XrayExposure.random draws from (kVp from 70, 75, 80, 85; photons log-uniform).
RANGES = {"kvp": (70.0, 85.0), "al_mm": (2.5, 4.0), "photons_per_pixel": (10 ** 4.5, 10 ** 5.2),
          "scatter_to_primary": (0.2, 0.6), "scatter_sigma_mm": (30.0, 60.0), "blur_px": (0.5, 1.1),
          "window_low_pct": (0.2, 3.0), "window_high_pct": (99.0, 99.9), "gamma": (0.75, 1.3),
          "unsharp_amount": (0.0, 0.8), "unsharp_sigma_mm": (8.0, 20.0)}
SIDES = ("right", "left")


def hip_bmd(model, image: np.ndarray, pixel_mm, heads: dict, pack, threshold: float, shift_px=(0, 0),
            kvp: float | None = None) -> np.ndarray:
    """Predicted BMD of both hips of a simulated radiograph, cut at the true centres (moved by
    ``shift_px`` crop pixels); ``kvp``: its tube voltage, for a model conditioned on it (as its DICOM
    would record it)."""
    zoom = np.asarray(pack.crop_mm) / np.asarray(pack.crop_px) / np.asarray(pixel_mm)
    crops = np.stack([v.recrop(image, pixel_mm, np.add(heads[s], np.multiply(shift_px, zoom)), s, pack) for s in SIDES])
    values, _ = v.predicted_bmd(model, crops, threshold, model.overview_of(image, pixel_mm), kvp)
    return values


def measure_patient(model, demo_case: Path, pack, threshold: float, noise_draws: int) -> dict:
    truth = json.loads((demo_case / "truth.json").read_text())
    settings = DemoSettings(seed=truth["seed"], proximal_femur_cut_mm=truth["proximal_femur_cut_mm"])
    patient, _, _ = draw_patient(truth["index"], settings)
    geometry = Geometry.from_dict(truth["geometry"])
    areal = project(patient.densities(), patient.grid, geometry)
    heads = v._true_heads(demo_case)[0]
    own = XrayExposure(**truth["exposure"])

    def simulate(exposure: XrayExposure, seed: int) -> np.ndarray:
        return simulate_radiograph(areal, geometry.pixel_mm, exposure, np.random.default_rng([seed, 7919])) * 65535

    def mean_bmd(exposure: XrayExposure) -> np.ndarray:
        return np.mean([hip_bmd(model, simulate(exposure, k), geometry.pixel_mm, heads, pack, threshold,
                                kvp=exposure.kvp)
                        for k in range(noise_draws)], axis=0)

    base = mean_bmd(own)
    out = {"case_id": demo_case.name, "bmd_own_settings": base.tolist(), "parameters": {}}
    for name, (low, high) in RANGES.items():
        levels = [low, (low + high) / 2, high]
        values = [mean_bmd(replace(own, **{name: float(level)})) for level in levels]
        out["parameters"][name] = {"levels": levels, "bmd": [x.tolist() for x in values],
                                   "span_pct": ((values[-1] - values[0]) / base * 100).tolist()}
    noise = np.array([hip_bmd(model, simulate(own, k), geometry.pixel_mm, heads, pack, threshold, kvp=own.kvp)
                      for k in range(8)])
    out["noise_cv_pct"] = (noise.std(0, ddof=1) / noise.mean(0) * 100).tolist()
    image = simulate(own, 0)
    shifts = [(dr, dc) for dr in (-2, 0, 2) for dc in (-2, 0, 2)]
    shifted = np.array([hip_bmd(model, image, geometry.pixel_mm, heads, pack, threshold, s, own.kvp) for s in shifts])
    out["crop_shift_cv_pct"] = (shifted.std(0, ddof=1) / shifted.mean(0) * 100).tolist()
    return out


def summarise(patients: list[dict]) -> dict:
    def stats(values) -> dict:
        a = np.asarray(values, float)
        return {"mean": float(a.mean()), "rms": float(np.sqrt((a ** 2).mean())), "n_hips": int(a.size)}

    out = {}
    for name in RANGES:
        spans = [s for p in patients for s in p["parameters"][name]["span_pct"]]
        out[name] = {"span_pct": stats(spans), "sd_if_drawn_pct": float(np.sqrt(np.mean(np.square(spans)) / 12))}
    out["noise_alone"] = {"cv_pct": stats([c for p in patients for c in p["noise_cv_pct"]])}
    out["crop_shift_2px"] = {"cv_pct": stats([c for p in patients for c in p["crop_shift_cv_pct"]])}
    parts = [out[n]["sd_if_drawn_pct"] for n in RANGES] + [out["noise_alone"]["cv_pct"]["rms"]]
    out["all_parameters_and_noise_sd_pct"] = float(math.sqrt(sum(p ** 2 for p in parts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--models", required=True, type=Path, nargs="+", help="folders <cohort>_fold<k>")
    ap.add_argument("--demo-root", required=True, type=Path, help="results/<cohort>/demo_input")
    ap.add_argument("--patients", type=int, default=3, help="held-out patients per model")
    ap.add_argument("--noise-draws", type=int, default=2, help="noise draws averaged per setting")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "processing_sensitivity.json")
    args = ap.parse_args()

    with open(args.shards / "index.csv") as f:
        folds: dict[int, list[str]] = {}
        for r in csv.DictReader(f):
            folds.setdefault(int(r["fold"]), [])
            if r["case_id"] not in folds[int(r["fold"])]:
                folds[int(r["fold"])].append(r["case_id"])
    pack = v._pack_settings(args.shards)
    threshold = pack.threshold_g_cm2
    t0 = time.time()
    result = {"command": "python benchmarks/processing_sensitivity.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, x)) if isinstance(x, list) else x}"
        for k, x in vars(args).items() if k != "out"), "models": {}}
    every = []
    for model_dir in args.models:
        fold = v.fold_of_model(model_dir)
        model = load_for_inference(model_dir)
        cases = sorted(folds.get(fold, []))[: args.patients]
        patients = []
        for case in cases:
            p = measure_patient(model, args.demo_root / case, pack, threshold, args.noise_draws)
            patients.append(p)
            print(model_dir.name, case, {n: np.round(x["span_pct"], 1).tolist() for n, x in p["parameters"].items()},
                  "noise", np.round(p["noise_cv_pct"], 2).tolist(), "shift", np.round(p["crop_shift_cv_pct"], 2).tolist(),
                  flush=True)
        every += patients
        result["models"][model_dir.name] = {"held_out_fold": fold, "patients": patients, "summary": summarise(patients)}
    result["summary"] = summarise(every)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
