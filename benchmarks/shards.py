"""Shard read throughput, side by side with per-case NIfTI files and the training step rate.

Measured in one run on the demo cohort's results (run the demo first: ``./run.sh demo``):

1. For every compression (none, lzf, gzip-1/4/9): pack the cohort (``bonedrr.shards.pack_cohort``),
   then read random samples with ``ShardDataset`` in a ``DataLoader`` (2 worker processes, batch 8,
   random order with replacement) and count samples per second; bytes per sample on disk.
2. The peer: the same samples (radiograph crop, DRR channels, mask) written as per-sample NIfTI files
   (``.nii.gz``, as a per-case layout would hold them), read by nibabel in the same DataLoader set-up.
3. The consumer: the CPU training step rate of the project's own decomposition network and losses
   (``bonedrr.train``: the U-Net of config ``train.network``, L1 + gradient correlation, AdamW; batch 8
   at the crop size, torch 2 threads).

The files are in the page cache after the first epoch (as they are during training on a machine
with enough memory), so this measures decoding and the loader, not the disk. The machine's load
(other processes) is recorded: on a shared machine every rate is lower, the ratios less so.

Usage:
    python benchmarks/shards.py [--results results/demo] [--out benchmarks/results/shards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bonedrr.config import load_config  # noqa: E402
from bonedrr.dataset import ShardDataset  # noqa: E402
from bonedrr.shards import COMPRESSIONS, PackSettings, pack_cohort  # noqa: E402

BATCH = 8
WORKERS = 2


class NiftiSamples(Dataset):
    """The peer: one folder per sample with xray.nii.gz, drr.nii.gz (C channels), mask.nii.gz and
    overview.nii.gz: the same arrays as a shard sample (targets would come from a table)."""

    def __init__(self, folders):
        self.folders = list(folders)

    def __len__(self):
        return len(self.folders)

    def __getitem__(self, i):
        import nibabel as nib

        d = self.folders[i]
        return {"xray": torch.from_numpy(np.asarray(nib.load(d / "xray.nii.gz").dataobj, np.float32)[None]),
                "drr": torch.from_numpy(np.asarray(nib.load(d / "drr.nii.gz").dataobj, np.float32)),
                "mask": torch.from_numpy(np.asarray(nib.load(d / "mask.nii.gz").dataobj, np.float32)[None]),
                "overview": torch.from_numpy(np.asarray(nib.load(d / "overview.nii.gz").dataobj, np.float32)[None])}


def write_nifti_peer(shards: ShardDataset, folder: Path) -> list[Path]:
    import nibabel as nib

    folders = []
    for i in range(len(shards)):
        item = shards[i]
        d = folder / item["sample_id"]
        d.mkdir(parents=True)
        for name, array in (("xray", item["xray"][0]), ("drr", item["drr"]), ("mask", item["mask"][0]),
                            ("overview", item["overview"][0])):
            nib.save(nib.Nifti1Image(array.numpy(), np.eye(4)), d / f"{name}.nii.gz")
        folders.append(d)
    return folders


def loader_rate(dataset, n_samples: int, repeats: int = 3) -> float:
    """Samples per second of random access through a DataLoader with persistent workers, as in
    training: the best of ``repeats`` epochs of ``n_samples`` after a warm-up epoch (worker start-up,
    file opening and the page cache)."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=n_samples,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=WORKERS, persistent_workers=True)
    rates = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        count = sum(batch["xray"].shape[0] for batch in loader)
        if r:
            rates.append(count / (time.perf_counter() - t))
    return max(rates)


def training_rate(shape, channels: int, steps: int = 20) -> float:
    """Samples per second of the project's training step on the CPU (torch 2 threads): its U-Net with the
    default config's ``train.network`` (stage 1's channels), L1 + gradient correlation at the default
    weights, backward, AdamW; augmentation and the loader excluded."""
    from bonedrr.config import load_config
    from bonedrr.model.losses import gc_loss, l1_loss
    from bonedrr.train import _unet

    train = load_config(REPO / "config" / "config.yaml")["train"]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = _unet(train["network"], channels)
    optimiser = torch.optim.AdamW(model.parameters(), float(train["lr"]))
    x = torch.rand(BATCH, 1, *shape)
    y = torch.rand(BATCH, channels, *shape)
    for i in range(steps + 3):
        if i == 3:
            t = time.perf_counter()
        optimiser.zero_grad()
        prediction = model(x)
        loss = train["loss"]["l1"] * l1_loss(prediction, y) + train["loss"]["gc"] * gc_loss(prediction, y)
        loss.backward()
        optimiser.step()
    return steps * BATCH / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "results" / "demo"), help="a cohort's results folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shards.json"))
    parser.add_argument("--samples", type=int, default=400, help="random samples read per epoch")
    args = parser.parse_args()
    cases = sorted(p for p in Path(args.results).iterdir() if (p / "bmd.json").is_file())
    if not cases:
        sys.exit(f"{args.results}: no case with bmd.json (run the demo first)")
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_at_start": os.getloadavg(),
           "torch": torch.__version__, "cases": len(cases),
           "batch": BATCH, "workers": WORKERS, "compressions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for compression in COMPRESSIONS:
            folder = tmp / compression
            t = time.perf_counter()
            manifest = pack_cohort(cases, folder, PackSettings(compression=compression), cohort="demo")
            pack_s = time.perf_counter() - t
            n = manifest["n_samples"]
            size = sum(s["bytes"] for s in manifest["shards"])
            rate = loader_rate(ShardDataset(folder), args.samples)
            out["compressions"][compression] = {"pack_s": round(pack_s, 2), "bytes_per_sample": round(size / n),
                                                "loader_samples_per_s": round(rate, 1)}
            print(compression, out["compressions"][compression], flush=True)
        reference = ShardDataset(tmp / "lzf")
        out["samples"] = len(reference)
        out["crop_px"] = reference.manifest["crop_px"]
        out["channels"] = reference.channels
        nifti = write_nifti_peer(reference, tmp / "nifti")
        nifti_bytes = sum(f.stat().st_size for d in nifti for f in d.iterdir())
        out["nifti_peer"] = {"bytes_per_sample": round(nifti_bytes / len(nifti)),
                             "loader_samples_per_s": round(loader_rate(NiftiSamples(nifti), args.samples), 1)}
        print("nifti", out["nifti_peer"], flush=True)
    shape = tuple(out["crop_px"])
    stage_1 = len(load_config(REPO / "config" / "config.yaml")["train"]["stages"][0]["channels"])
    out["training"] = {
        "what": "the project's training step (bonedrr.train's U-Net at config/config.yaml's train.network, stage 1's "
                f"{stage_1} channels, L1 + GC, AdamW), batch 8, CPU, torch 2 threads",
        "samples_per_s": round(training_rate(shape, stage_1), 1)}
    print("training", out["training"], flush=True)
    train = out["training"]["samples_per_s"]
    for name, c in out["compressions"].items():
        c["x_training"] = round(c["loader_samples_per_s"] / train, 1)
        c["x_nifti"] = round(c["loader_samples_per_s"] / out["nifti_peer"]["loader_samples_per_s"], 1)
    # The choice: the smallest files among those that read at least 10x NIfTI and 5x training; if none
    # does, the fastest reader (size cannot buy back a loader that is too slow)
    fast = {k: v for k, v in out["compressions"].items() if v["x_training"] >= 5 and v["x_nifti"] >= 10}
    if fast:
        out["chosen_compression"] = min(fast, key=lambda k: fast[k]["bytes_per_sample"])
    else:
        out["chosen_compression"] = max(out["compressions"], key=lambda k: out["compressions"][k]["loader_samples_per_s"])
    out["rule"] = ("smallest bytes per sample among compressions reading >= 5x training and >= 10x NIfTI; "
                   "if none does, the fastest reader")
    out["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
