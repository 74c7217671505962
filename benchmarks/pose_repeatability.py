"""Multi-pose repeatability of trained models, with the views' exposure protocol repeated or drawn anew.

The validation's pose sweep reads the extra views a demo cohort was generated with. This benchmark
makes them on the fly for the held-out patients of each cross-validation model, so that the same
poses can be read under both of the demo's view protocols (``demo.views_protocol``):

* ``same``: repeat radiographs on the case's device and exam protocol (its kVp, filtration and
  processing; another dose, scatter and noise), as a patient's radiographs in different poses are
  taken in a clinic (:meth:`bonedrr.demo.xray_physics.XrayExposure.repeat`);
* ``random``: each view with its own kVp and processing, as from another site (the demo's views
  before ``views_protocol`` existed).

Each held-out patient is rebuilt (:func:`bonedrr.demo.cohort.draw_patient`); view ``k`` is
:func:`bonedrr.demo.cohort.simulate_view`, the image a demo cohort with ``extra_views`` would have
written as ``views/view<k>.dcm``. The case's own radiograph (as ingested) is radiograph 0. Every hip is
cut at its true centre on each radiograph (the pose sweep's ``bmd_true_hips``: the locator's share
left out) and its predicted BMD's RMS-CV over the radiographs is reported, with the true DRR-BMD's own
RMS-CV at the same poses (the case's density and labels rendered there: the floor).

Works on any cohort with ``demo_input`` and case folders, e.g. the truth-pose cohort of
``benchmarks/truth_pose_cohort.sh`` (which is made without views):

    python benchmarks/pose_repeatability.py --shards OUT/shards --cases-root OUT/cases \\
        --demo-root OUT/demo_input --models MODELS/fold0 --patients 8 --views 4

Writes benchmarks/results/pose_repeatability.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bonedrr import validate as v
from bonedrr.dataset import read_index
from bonedrr.demo.cohort import VIEWS_PROTOCOLS, DemoSettings, draw_patient, simulate_view
from bonedrr.demo.naming import DEFAULTS
from bonedrr.demo.xray_physics import XrayExposure
from bonedrr.estimate import load_for_inference
from bonedrr.metrics import rms_cv

REPO = Path(__file__).resolve().parents[1]
SIDES = ("right", "left")


def hips_bmd(model, image: np.ndarray, pixel_mm, heads: dict, pack, threshold: float, kvp: float) -> list[float]:
    """Predicted BMD of each hip of one radiograph, cut at its true centre (:data:`SIDES` order)."""
    crops = np.stack([v.recrop(image, pixel_mm, heads[s], s, pack) for s in SIDES])
    values, _ = v.predicted_bmd(model, crops, threshold, model.overview_of(image, pixel_mm), kvp)
    return [float(x) for x in values]


def measure_patient(model, demo_case: Path, case_dir: Path, pack, threshold: float, n_views: int) -> dict:
    """One patient: per protocol, each hip's predicted BMD on its own radiograph and ``n_views`` views;
    the true DRR-BMD at the same poses."""
    truth = json.loads((demo_case / "truth.json").read_text())
    geometry = truth["geometry"]
    settings = DemoSettings(seed=truth["seed"], rows=geometry["rows"], cols=geometry["cols"],
                            pixel_mm=tuple(geometry["pixel_mm"]), sdd_mm=DEFAULTS["sdd_mm"],
                            proximal_femur_cut_mm=truth["proximal_femur_cut_mm"], extra_views=n_views,
                            presentation=truth.get("presentation", "processed"))
    patient, _, _ = draw_patient(truth["index"], settings)
    exposure = XrayExposure(**truth["exposure"])
    own_image, own_pixel_mm, _ = v._case_radiograph(case_dir)
    out = {"case_id": demo_case.name, "kvp": exposure.kvp, "protocols": {}}
    geometries = None
    for protocol in VIEWS_PROTOCOLS:
        views = [simulate_view(patient, truth["view_centre_world_mm"], exposure,
                               replace(settings, views_protocol=protocol), truth["index"], k)
                 for k in range(1, n_views + 1)]
        geometries = [geometry] + [view["geometry"] for view in views]
        heads = v.true_heads_at(demo_case / "labels.nii.gz", geometries)
        bmd = [hips_bmd(model, own_image, own_pixel_mm, heads[0], pack, threshold, exposure.kvp)]
        for view, view_heads in zip(views, heads[1:]):
            bmd.append(hips_bmd(model, view["image"] * 65535, settings.pixel_mm, view_heads, pack, threshold,
                                view["exposure"]["kvp"]))
        out["protocols"][protocol] = {"bmd": bmd, "kvp": [exposure.kvp] + [w["exposure"]["kvp"] for w in views]}
    cut = json.loads((case_dir / "bmd.json").read_text()).get("proximal_femur_cut_mm", 80.0)
    truth_at = v.true_drr_bmd_at(case_dir, geometries, threshold, cut)
    out["true_drr_bmd"] = [[float(t[s]) for s in SIDES] for t in truth_at]
    return out


def summarise(patients: list[dict]) -> dict:
    """RMS-CV (%) per protocol and of the truth, over every hip of these patients."""
    def over(key) -> dict:
        per_hip = [np.asarray(p[key] if key == "true_drr_bmd" else p["protocols"][key]["bmd"])[:, j]
                   for p in patients for j in range(len(SIDES))]
        r = rms_cv(per_hip)
        return {"rms_cv_pct": round(100 * r["rms_cv"], 2), "n_hips": r["n_subjects"],
                "n_radiographs": r["n_measurements"]}

    return {**{f"predicted_{p}": over(p) for p in VIEWS_PROTOCOLS}, "true_drr_bmd": over("true_drr_bmd")}


def held_out_parser(description: str, default_out: Path) -> argparse.ArgumentParser:
    """The arguments of a benchmark over the held-out patients of fold models (also ``pose_error_parts.py``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shards", required=True, type=Path)
    ap.add_argument("--models", required=True, type=Path, nargs="+", help="model folders named <anything>_fold<k> "
                    "or fold<k> (k: the held-out fold)")
    ap.add_argument("--demo-root", required=True, type=Path, help="the cohort's demo_input folder")
    ap.add_argument("--cases-root", required=True, type=Path, help="the cohort's case folders (results/<cohort>)")
    ap.add_argument("--patients", type=int, default=6, help="held-out patients per model")
    ap.add_argument("--views", type=int, default=4, help="views per patient besides its own radiograph")
    ap.add_argument("--out", type=Path, default=default_out)
    return ap


def over_held_out(args, script: str, measure, summary) -> None:
    """``measure(model, demo_case, case_dir, pack)`` on the first ``args.patients`` held-out patients of
    each model in ``args.models``, ``summary(patients)`` per model; written to ``args.out``."""
    folds: dict[int, set[str]] = {}
    for row in read_index(args.shards):
        folds.setdefault(int(row["fold"]), set()).add(row["case_id"])
    pack = v._pack_settings(args.shards)
    t0 = time.time()
    result = {"command": f"python benchmarks/{script} " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, x)) if isinstance(x, list) else x}"
        for k, x in vars(args).items() if k != "out"), "models": {}}
    for model_dir in args.models:
        fold = v.fold_of_model(model_dir)
        model = load_for_inference(model_dir)
        patients = [measure(model, args.demo_root / case, args.cases_root / case, pack)
                    for case in sorted(folds.get(fold, []))[: args.patients]]
        result["models"][str(model_dir)] = {"held_out_fold": fold, "patients": patients,
                                            "summary": summary(patients)}
        print(model_dir, json.dumps(result["models"][str(model_dir)]["summary"]), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    args = held_out_parser(__doc__.splitlines()[0], REPO / "benchmarks" / "results" / "pose_repeatability.json").parse_args()

    def measure(model, demo_case, case_dir, pack) -> dict:
        p = measure_patient(model, demo_case, case_dir, pack, pack.threshold_g_cm2, args.views)
        print(demo_case.name, {k: np.round(np.asarray(x["bmd"]), 3).T.tolist() for k, x in p["protocols"].items()},
              flush=True)
        return p

    over_held_out(args, "pose_repeatability.py", measure, summarise)


if __name__ == "__main__":
    main()
