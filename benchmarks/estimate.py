"""``bonedrr estimate`` as a clinic runs it: one radiograph, a fresh process, wall time.

Side by side in one run, interleaved: the model's torch-free copy (``model.npz``, NumPy; what the CPU
default runs) and the torch model (the same folder without ``model.npz``, what ``estimate`` ran before
the copy existed). Each call is a new ``python -m bonedrr estimate`` process, so python's start-up and
the imports count, as for a user. Also the predicted BMD of both (they must agree), python's bare
start-up, and the machine's load while measuring (this 2-core machine is often shared: the load says
how far the times are upper bounds).

Run:
    python benchmarks/estimate.py --model results/models/demo_all --xray results/demo/demo_input/demo_000/xray.dcm
Writes benchmarks/results/estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def call(model: Path, xray: Path, threads: int | None) -> tuple[float, dict]:
    """One fresh-process ``bonedrr estimate --json``: (wall seconds, its result)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bonedrr", "estimate", "--model", str(model), "--xray", str(xray),
                        "--json"], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="a trained model folder (model.pt and model.npz)")
    ap.add_argument("--xray", required=True, type=Path, nargs="+", help="full AP pelvis radiographs (DICOM)")
    ap.add_argument("--repeats", type=int, default=5, help="calls per radiograph and variant")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the calls (default: the machine's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "estimate.json")
    args = ap.parse_args()
    if not (args.model / "model.npz").is_file():
        raise SystemExit(f"{args.model}: no model.npz (a model trained before it existed: load it with "
                         "bonedrr.train.load_model and save it again)")

    with tempfile.TemporaryDirectory() as tmp:
        torch_only = Path(tmp) / args.model.name
        torch_only.mkdir()
        shutil.copy(args.model / "model.pt", torch_only / "model.pt")  # the same weights, no model.npz
        times: dict[str, list[float]] = {"numpy": [], "torch": []}
        bmd: dict[str, list[float]] = {"numpy": [], "torch": []}
        loads = []
        for r in range(args.repeats):
            for xray in args.xray:
                for name, folder in (("numpy", args.model), ("torch", torch_only)):
                    seconds, result = call(folder, xray, args.threads)
                    times[name].append(seconds)
                    if r == 0:
                        bmd[name] += [s["drr_bmd_g_cm2"] for s in result["sides"].values()]
                    loads.append(os.getloadavg()[0])
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = (time.perf_counter() - t0) / args.repeats

    summary = {name: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "max_s": float(np.max(v)),
                      "n": len(v)} for name, v in times.items()}
    results = {
        "what": "fresh-process `bonedrr estimate --json` of one full AP pelvis radiograph (both hips: locator, "
                "crop, decomposition, BMD), wall seconds; numpy = model.npz (the CPU default), torch = the same "
                "model.pt without model.npz",
        "model": args.model.name, "radiographs": [x.name for x in args.xray], "repeats": args.repeats,
        "omp_num_threads": args.threads, "seconds": summary,
        "torch_over_numpy_median": summary["torch"]["median_s"] / summary["numpy"]["median_s"],
        "python_bare_start_s": bare,
        "max_bmd_difference_g_cm2": float(np.max(np.abs(np.subtract(bmd["numpy"], bmd["torch"])))),
        "target_s": 2.0, "target_met_median": summary["numpy"]["median_s"] < 2.0,
        "load_average_1min": {"median": float(np.median(loads)), "max": float(np.max(loads))},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("seconds", "torch_over_numpy_median", "max_bmd_difference_g_cm2",
                                              "load_average_1min")}, indent=2))


if __name__ == "__main__":
    main()
