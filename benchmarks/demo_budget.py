"""Time of the demo's stages per patient, against the demo's 15-minute budget on 2 CPU cores.

Run: python benchmarks/demo_budget.py [--patients 4]
Writes benchmarks/results/demo_budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bonedrr.config import load_config
from bonedrr.demo.cohort import DemoSettings, make_case
from bonedrr.demo.naming import case_files, case_id
from bonedrr.ingest import ingest_case

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    args = parser.parse_args()
    demo = load_config(REPO / "config" / "config.yaml")["cohorts"]["demo"]
    d, x = demo["demo"], demo["xray"]
    settings = DemoSettings(seed=d["seed"], rows=d["rows"], cols=d["cols"], pixel_mm=tuple(x["pixel_mm"]),
                            sdd_mm=x["sdd_mm"], nifti_png_every=d["nifti_png_every"])
    timings = {"demo_patient": [], "ingest": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_case(tmp / "warm", "warm", 99, settings)  # template loading is once per process
        for i in range(args.patients):
            t0 = time.perf_counter()
            make_case(tmp / case_id(i), case_id(i), i, settings)
            t1 = time.perf_counter()
            files = case_files(i, settings.nifti_png_every)
            ingest_case(case_id(i), tmp / case_id(i) / files["ct"], tmp / case_id(i) / files["xray"],
                        tmp / "out" / case_id(i), pixel_mm=settings.pixel_mm, sdd_mm=settings.sdd_mm)
            timings["demo_patient"].append(t1 - t0)
            timings["ingest"].append(time.perf_counter() - t1)
    per_patient = {k: sum(v) / len(v) for k, v in timings.items()}
    n = d["n_patients"]
    cores = 2
    estimate = sum(per_patient.values()) * n / cores
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
        "settings": {"n_patients": n, "rows": settings.rows, "cols": settings.cols},
        "seconds_per_patient": {k: round(v, 2) for k, v in per_patient.items()},
        "demo_patient_and_ingest_seconds_on_2_cores_estimate": round(estimate, 1),
        "note_other_stages": "calibrate, drr and register are timed by the workflow run (README) and benchmarks/drr.py, register.py",
        "budget_seconds": BUDGET_S,
        "share_of_budget": round(estimate / BUDGET_S, 3),
        "note": "one process per job: template loading (about 0.5 s) is paid by every demo_patient job too",
    }
    out = REPO / "benchmarks" / "results" / "demo_budget.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
