"""What the multi-pose spread of a model's BMD is made of: the pose or the noise; the bone's outline or its
density level.

For the first held-out patients of each cross-validation model, every hip is seen at its radiograph's
pose and at the demo's view poses (:func:`bonedrr.demo.cohort.simulate_view`'s geometries), always at
the case's own exposure protocol (:meth:`~bonedrr.demo.xray_physics.XrayExposure.repeat`), and cut at
its true centre. At each pose the predicted proximal-femur DRR is compared with the true one rendered
there (the case's density and labels), so the truth's own change with the pose is divided out:

* ``bmd``: predicted / true DRR-BMD, radiographs as the views are (new pose, dose, scatter and noise);
* ``bmd_noiseless``: the same radiographs with 1000 times the quanta: the pose alone;
* ``bmd_noise_only``: the radiograph's own pose, ``--noise-draws`` noise draws: the noise alone;
* ``area``: predicted / true projected area (pixels above the DRR-BMD threshold): the outline;
* ``level``: the prediction's mean over the TRUE projected area / the true DRR-BMD: the density level.

Each is reported as the RMS over hips of its coefficient of variation over the radiographs (%), like
the validation's multi-pose RMS-CV; ``*_across_hips_sd_pct`` is the SD over hips of the same ratio on
the case's own radiograph: the hip-to-hip error that Pearson r sees.

    python benchmarks/pose_error_parts.py --shards OUT/shards --cases-root OUT/cases \\
        --demo-root OUT/demo_input --models MODELS/fold0 --patients 8 --views 4

Writes benchmarks/results/pose_error_parts.json.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from bonedrr import validate as v
from bonedrr.bmd import BMD_CHANNEL, drr_bmd
from bonedrr.demo.cohort import DemoSettings, draw_patient, simulate_view
from bonedrr.demo.naming import DEFAULTS
from bonedrr.demo.projector import project
from bonedrr.demo.xray_physics import XrayExposure, simulate_radiograph
from bonedrr.drr import DEFAULT_CHANNELS, render_case
from bonedrr.geometry import Geometry
from bonedrr.metrics import rms_cv
from pose_repeatability import SIDES, held_out_parser, over_held_out  # benchmarks/, the script's folder

REPO = Path(__file__).resolve().parents[1]
PARTS = ("bmd", "bmd_noiseless", "bmd_noise_only", "area", "level")


def _prediction(model, image: np.ndarray, pixel_mm, heads: dict, pack) -> np.ndarray:
    """The predicted proximal-femur DRR of each hip (:data:`SIDES` order), cut at its true centre."""
    crops = np.stack([v.recrop(image, pixel_mm, heads[s], s, pack) for s in SIDES])
    _, pred = v.predicted_bmd(model, crops, pack.threshold_g_cm2, model.overview_of(image, pixel_mm))
    return pred[:, list(model.channels).index(BMD_CHANNEL)]


def measure_patient(model, demo_case: Path, case_dir: Path, pack, n_views: int, noise_draws: int) -> dict:
    """Per part (:data:`PARTS`), each radiograph's predicted / true ratio for both hips (radiographs x 2)."""
    truth = json.loads((demo_case / "truth.json").read_text())
    geometry, th = truth["geometry"], pack.threshold_g_cm2
    settings = DemoSettings(seed=truth["seed"], rows=geometry["rows"], cols=geometry["cols"],
                            pixel_mm=tuple(geometry["pixel_mm"]), sdd_mm=DEFAULTS["sdd_mm"],
                            proximal_femur_cut_mm=truth["proximal_femur_cut_mm"], extra_views=n_views,
                            presentation=truth.get("presentation", "processed"))
    patient, _, _ = draw_patient(truth["index"], settings)
    exposure = XrayExposure(**truth["exposure"])
    geometries = [geometry] + [simulate_view(patient, truth["view_centre_world_mm"], exposure, settings,
                                             truth["index"], k)["geometry"] for k in range(1, n_views + 1)]
    heads = v.true_heads_at(demo_case / "labels.nii.gz", geometries)
    channels = {f"proximal_femur_{s}": DEFAULT_CHANNELS[f"proximal_femur_{s}"] for s in SIDES}
    rng = np.random.default_rng([truth["index"], 5])
    out = {part: [] for part in PARTS}
    for k, (g, hips) in enumerate(zip(geometries, heads)):
        geo = Geometry.from_dict(g)
        drr = render_case(case_dir / "density.nii.gz", case_dir / "labels.nii.gz", geo, channels=channels,
                          device="cpu", cut_mm=truth["proximal_femur_cut_mm"])
        true = [v.recrop(drr["drr"][drr["channels"].index(f"proximal_femur_{s}")], g["pixel_mm"], hips[s], s, pack)
                for s in SIDES]
        true_bmd = np.array([drr_bmd(t, th) for t in true])
        areal = project(patient.densities(), patient.grid, geo)
        shot = exposure.repeat(np.random.default_rng([truth["index"], 6, k]))

        def ratio(image) -> np.ndarray:
            return np.array([drr_bmd(p, th) for p in _prediction(model, image * 65535, settings.pixel_mm, hips,
                                                                 pack)]) / true_bmd

        pred = _prediction(model, simulate_radiograph(areal, settings.pixel_mm, shot, rng, settings.presentation) * 65535,
                           settings.pixel_mm, hips, pack)
        out["bmd"].append([drr_bmd(p, th) for p in pred] / true_bmd)
        out["area"].append([(p > th).sum() / (t > th).sum() for p, t in zip(pred, true)])
        out["level"].append([p[t > th].mean() for p, t in zip(pred, true)] / true_bmd)
        quiet = replace(shot, photons_per_pixel=shot.photons_per_pixel * 1000)
        out["bmd_noiseless"].append(ratio(simulate_radiograph(areal, settings.pixel_mm, quiet, rng, settings.presentation)))
        if k == 0:
            out["bmd_noise_only"] = [ratio(simulate_radiograph(areal, settings.pixel_mm, shot, rng, settings.presentation))
                                     for _ in range(noise_draws)]
    return {"case_id": demo_case.name, **{part: np.asarray(x, float).tolist() for part, x in out.items()}}


def summarise(patients: list[dict]) -> dict:
    """RMS-CV (%) of each part over every hip's radiographs, and the hip-to-hip SD (%) of each ratio on
    the radiograph's own pose."""
    out = {}
    for part in PARTS:
        per_hip = [np.asarray(p[part])[:, j] for p in patients for j in range(len(SIDES))]
        out[f"{part}_rms_cv_pct"] = round(100 * rms_cv(per_hip)["rms_cv"], 2)
        if part != "bmd_noise_only":
            out[f"{part}_across_hips_sd_pct"] = round(100 * float(np.std([h[0] for h in per_hip], ddof=1)), 2)
    out["n_hips"] = 2 * len(patients)
    return out


def main() -> None:
    ap = held_out_parser(__doc__.splitlines()[0], REPO / "benchmarks" / "results" / "pose_error_parts.json")
    ap.add_argument("--noise-draws", type=int, default=5, help="noise draws at the radiograph's own pose")
    args = ap.parse_args()
    over_held_out(args, "pose_error_parts.py",
                  lambda model, demo_case, case_dir, pack: measure_patient(model, demo_case, case_dir, pack,
                                                                           args.views, args.noise_draws),
                  summarise)


if __name__ == "__main__":
    main()
