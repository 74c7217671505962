"""Cross-validated training of the decomposition model: time per model and held-out DRR-BMD accuracy.

Trains one model per held-out fold of a cohort's shards with the config's ``train:`` block (optionally
with other epochs), on the CPU or a GPU, then reads DRR-BMD off each held-out fold exactly as
``bonedrr validate`` does. Reports seconds per model (and per optimiser step), and Pearson r against
DRR-BMD and QCT vBMD over all held-out hips, plus each model's r on its own training hips (how well it
fits what it saw).

With ``--parallel N``, N fold models train at once (on a GPU: processes share the card; the time per
model is then each process's own wall time).

Run:
    python benchmarks/train_folds.py --shards results/demo/shards [--device cuda] [--epochs 150 150]
        [--parallel 5] [--out benchmarks/results/train_folds_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def train_one(shards: Path, out: Path, settings: dict, fold: int, device: str, threads: int) -> float:
    """Train the model that holds ``fold`` out (a fresh ``bonedrr train`` process); its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bonedrr", "train", "--shards", str(shards), "--out", str(out),
                    "--threads", str(threads), "--device", device, "--hold-out", str(fold),
                    "--settings", json.dumps(settings)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a cohort's shard folder")
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"), help="its train: block is used")
    parser.add_argument("--epochs", type=int, nargs="+", help="epochs per stage instead of the config's")
    parser.add_argument("--folds", type=int, nargs="+", help="held-out folds to train (default: every fold)")
    parser.add_argument("--set", default="{}", metavar="JSON",
                        help='train settings over the config\'s (e.g. \'{"network": {"condition": "tone"}}\'; '
                             'a dict value is merged into the config\'s)')
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="fold models trained at once")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per training process")
    parser.add_argument("--eval-shards", help="read the held-out folds from this shard folder instead (packed with "
                        "the same folds and seed, e.g. a cohort's radiographs without its training views)")
    parser.add_argument("--models", help="folder for the fold models (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="evaluate a fold model already in --models "
                        "instead of training it again (its seconds are then not measured)")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/train_folds_<device>.json)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from bonedrr.dataset import ShardDataset
    from bonedrr.metrics import icc
    from bonedrr.train import load_model
    from bonedrr.validate import load_samples

    shards = Path(args.shards)
    settings = yaml.safe_load(Path(args.config).read_text())["train"]
    if args.epochs:
        if len(args.epochs) != len(settings["stages"]):
            raise SystemExit(f"--epochs needs {len(settings['stages'])} numbers, one per stage")
        settings["stages"] = [{**s, "epochs": e} for s, e in zip(settings["stages"], args.epochs)]
    for key, value in json.loads(args.set).items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) and isinstance(settings.get(key), dict) \
            else value
    folds = args.folds or sorted({int(row["fold"]) for row in ShardDataset(shards).index})
    models = Path(args.models or tempfile.mkdtemp(prefix="train_folds_"))
    models.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        seconds = list(pool.map(lambda k: None if args.reuse and (models / f"fold{k}" / "model.pt").is_file()
                                else train_one(shards, models / f"fold{k}", settings, k, args.device, args.threads),
                                folds))
    wall = time.perf_counter() - t0

    pred, true, qct, per_fold = [], [], [], {}
    for k, sec in zip(folds, seconds):
        model = load_model(models / f"fold{k}")
        held = load_samples(ShardDataset(Path(args.eval_shards) if args.eval_shards else shards, folds=[k]))
        p = model.bmd(model.predict(held["xray"], model.scale_of(held["overview"]), kvp=held["kvp"]))
        seen = load_samples(ShardDataset(shards, exclude_folds=[k]))
        p_seen = model.bmd(model.predict(seen["xray"], model.scale_of(seen["overview"]), kvp=seen["kvp"]))
        steps = sum(s["epochs"] for s in settings["stages"]) * int(np.ceil(len(seen["xray"]) / settings["batch_size"]))
        # seconds: the whole process (start-up, the hip locator's epochs, both stages, saving)
        per_fold[str(k)] = {"seconds": None if sec is None else round(sec, 1), "stage_optimiser_steps": steps, "held_out_hips": len(p),
                            "training_r_vs_drr_bmd": round(float(np.corrcoef(p_seen, seen["drr_bmd"])[0, 1]), 3)}
        pred += list(p)
        true += list(held["drr_bmd"])
        qct += list(held["qct_vbmd"])
    pred, true, qct = map(np.asarray, (pred, true, qct))
    result = {
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_process": args.threads,
                    "parallel": args.parallel},
        "shards": str(shards), "eval_shards": args.eval_shards, "stages": settings["stages"], "batch_size": settings["batch_size"],
        "wall_seconds_all_folds": round(wall, 1), "folds": per_fold,
        "train": {key: settings[key] for key in ("network", "augment", "input_scale", "input_span", "open_beam", "ema") if key in settings},
        "held_out": {"hips": len(pred), "r_vs_drr_bmd": round(float(np.corrcoef(pred, true)[0, 1]), 3),
                     "icc21_vs_drr_bmd": round(icc(np.column_stack([true, pred]))["icc_2_1"], 3),
                     "r_vs_qct_vbmd": round(float(np.corrcoef(pred, qct)[0, 1]), 3),
                     "r_drr_bmd_vs_qct_vbmd": round(float(np.corrcoef(true, qct)[0, 1]), 3),
                     "mae_vs_drr_bmd_g_cm2": round(float(np.abs(pred - true).mean()), 3)},
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"train_folds_{args.device}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
