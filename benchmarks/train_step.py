"""Where a training step's time goes: loading, augmentation, input scale, the network.

Trains the configured model (with ``--set`` settings over it) for ``--epochs`` epochs of its first
stage on a cohort's shards, twice: once timed by the wall clock alone, once under cProfile, whose
cumulative times split each optimiser step into the batch's loading (the DataLoader), its
augmentation (``RandomAugment``), its input scale (the overview's quantiles) and the rest (the
network's forward and backward passes, the optimiser, the moving average). On a GPU the first three
run on the host and the rest on the card, so they bound the step however fast the card is.

Run:
    python benchmarks/train_step.py --shards results/demo/shards [--device cuda] [--epochs 2]
        [--set '{"input_scale": "detector", "network": {"equivariant": true}}'] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PARTS = {"load": ("dataloader.py", "__next__"), "augment": ("augment.py", "__call__"),
         "input_scale": ("train.py", "_input_scale"), "stage_epoch": ("train.py", "_stage_epoch")}


def settings_for(args):
    from bonedrr.train import TrainSettings

    block = yaml.safe_load(Path(args.config).read_text())["train"]
    for key, value in json.loads(args.set).items():
        block[key] = {**block[key], **value} if isinstance(value, dict) and isinstance(block.get(key), dict) else value
    first = block["stages"][0]
    # one stage of the given epochs, and the proximal femur (every model needs it) in it
    channels = list(dict.fromkeys([*first["channels"], "proximal_femur"]))
    block["stages"] = [{"channels": channels, "epochs": args.epochs}]
    block["locator"] = {**block.get("locator", {}), "epochs": 0}
    return TrainSettings.from_config(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a cohort's shard folder")
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"), help="its train: block is used")
    parser.add_argument("--set", default="{}", metavar="JSON", help="train settings over the config's")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from bonedrr.train import train_model

    torch.set_num_threads(args.threads)
    settings = settings_for(args)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train_model(args.shards, Path(tmp) / "wall", settings, device=args.device, progress=False)
        wall = time.perf_counter() - t
        profile = cProfile.Profile()
        profile.enable()
        train_model(args.shards, Path(tmp) / "profiled", settings, device=args.device, progress=False)
        profile.disable()
        log = (Path(tmp) / "wall" / "train_log.tsv").read_text().splitlines()
    epoch_seconds = [float(r.split("\t")[-1]) for r in log[1:]]
    stats = pstats.Stats(profile).stats
    cumulative = {}
    for part, (file, function) in PARTS.items():
        cumulative[part] = sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file) and name == function)
    from bonedrr.dataset import ShardDataset

    n = len(ShardDataset(args.shards, channels=list(settings.channels)))
    steps_per_epoch = n // settings.batch_size if n > settings.batch_size else 1
    steps = steps_per_epoch * args.epochs
    per_step = {k: round(1000 * v / steps, 1) for k, v in cumulative.items()}
    per_step["network_and_rest"] = round(per_step.pop("stage_epoch") - per_step["load"] - per_step["augment"]
                                         - per_step["input_scale"], 1)
    result = {
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "threads": args.threads},
        "shards": args.shards, "samples": n, "batch_size": settings.batch_size, "epochs": args.epochs,
        "optimiser_steps": steps, "settings": json.loads(args.set),
        "wall_ms_per_step": round(1000 * sum(epoch_seconds) / steps, 1),
        "epoch_seconds": epoch_seconds,
        "train_model_seconds": round(wall, 1),
        "profiled_ms_per_step": per_step,
        "note": "wall_ms_per_step: the unprofiled run's epochs (each with its checkpoint) over its steps; "
                "train_model_seconds adds the set-up (the cohort's input span, the model's files). The profiled "
                "split is cProfile's cumulative time of each part over the same steps (the profiler adds its own "
                "overhead to Python-heavy parts)",
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
