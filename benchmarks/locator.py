"""Hip locator accuracy on held-out samples, side by side with a fixed-position prior; estimate speed.

For each cross-validation model folder (trained with ``--hold-out k``), the femoral-head centre found
by the model's locator in each held-out sample's overview is compared with the registered truth
(``head_overview_px`` of the shards), in mm at the detector (overview pixels times the overview's
mm per pixel, from the sample's geometry in the shard). The peer: the mean head position of the
model's training samples (what a fixed crop would assume). Also the in-process time of
``bonedrr.estimate.estimate`` on each held-out case's ingested radiograph (model loaded each time, as
the command does; python and torch start-up excluded, reported apart).

Run:
    python benchmarks/locator.py --shards results/demo/shards --models results/models/demo_fold*
Writes benchmarks/results/locator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from bonedrr.dataset import ShardDataset  # noqa: E402
from bonedrr.train import load_model  # noqa: E402


def mm_per_overview_px(geometry: dict) -> float:
    """The overview's pixel size (mm at the detector): the radiograph fitted into 128 x 256."""
    return max(geometry["rows"] * geometry["pixel_mm"][0] / 128, geometry["cols"] * geometry["pixel_mm"][1] / 256)


def evaluate(model_dir: Path, shards: Path) -> dict:
    model = load_model(model_dir)
    held_out = model.info.get("exclude_folds") or []
    test = ShardDataset(shards, folds=held_out)
    train = ShardDataset(shards, exclude_folds=held_out)
    prior = np.mean([train[i]["head_overview_px"].numpy() for i in range(len(train))], 0)
    ours, peer = [], []
    for i, row in enumerate(test.index):
        item = test[i]
        with h5py.File(shards / row["shard"], "r") as f:
            scale = mm_per_overview_px(json.loads(f["geometry"][int(row["row"])]))
        with torch.no_grad():
            rc, _ = model.locator.locate(item["overview"][None])
        truth = item["head_overview_px"].numpy()
        ours.append(float(np.linalg.norm(rc[0].numpy() - truth) * scale))
        peer.append(float(np.linalg.norm(prior - truth) * scale))
    return {"model": model_dir.name, "held_out_folds": held_out, "n_samples": len(ours),
            "locator_error_mm": {"median": float(np.median(ours)), "max": float(np.max(ours)), "all": ours},
            "fixed_prior_error_mm": {"median": float(np.median(peer)), "max": float(np.max(peer))},
            "median_ratio_prior_to_locator": float(np.median(peer) / max(np.median(ours), 1e-9)),
            "cases": sorted({r["case_id"] for r in test.index})}


def estimate_seconds(model_dir: Path, case_dirs: list[Path]) -> list[float]:
    from bonedrr.estimate import estimate

    out = []
    for case in case_dirs:
        t0 = time.perf_counter()
        estimate(model_dir, _radiograph(case), pixel_mm=(1.4, 1.4))
        out.append(time.perf_counter() - t0)
    return out


def _radiograph(case_dir: Path) -> Path:
    """The case's original radiograph (the demo's input folder), as a clinic would have it."""
    demo_input = case_dir.parent / "demo_input" / case_dir.name
    return next(p for p in sorted(demo_input.iterdir()) if p.name.startswith("xray."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "locator.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for model_dir in args.models:
        r = evaluate(model_dir, args.shards)
        cases = [args.shards.parent / c for c in r["cases"]]
        r["estimate_seconds_in_process"] = estimate_seconds(model_dir, cases)
        results.append(r)
        print(f"{r['model']}: locator median {r['locator_error_mm']['median']:.1f} mm (max "
              f"{r['locator_error_mm']['max']:.1f}), fixed prior {r['fixed_prior_error_mm']['median']:.1f} mm; "
              f"estimate {np.median(r['estimate_seconds_in_process']):.2f} s in process")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, scipy.ndimage, SimpleITK, pydicom"], check=True)
    startup = time.perf_counter() - t0
    record = {"threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0],
              "python_and_imports_startup_s": startup, "models": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"start-up (python + torch, scipy, SimpleITK, pydicom imports): {startup:.2f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
