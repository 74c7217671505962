"""Shard read throughput, side by side with per-sample NIfTI files and the training step rate.

Measured in one run on the demo cohort's results (run the demo first: ``./run.sh demo``):

1. For every compression (none, lzf, gzip-1/4/9): pack the cohort (``bonedrr.shards.pack_cohort``),
   then read samples in random order with ``ShardDataset`` in a ``DataLoader`` (batch 8, shuffled
   epochs as in training) and count samples per second, in four set-ups:

   - ``workers_2``: 2 worker processes, the default collate;
   - ``workers_2_shard_collate``: 2 worker processes, ``collate_fn=ShardDataset.collate`` (the same
     batches, all tensors of a batch in one shared-memory block, so one transfer from a worker
     instead of one per key);
   - ``workers_2_batch_ring``: 2 worker processes, ``collate_fn=SharedBatchRing()`` (the same
     batches again, written into a ring of shared-memory blocks that each worker reuses, so no
     fresh pages are allocated per batch);
   - ``workers_2_mapped``: 2 worker processes through ``MappedBatchLoader`` (the same batches, written
     by the workers into a ring of blocks that the main process mapped once before forking them, so
     only the slot and the layout travel back, not a file descriptor per batch);
   - ``workers_0``: no worker process, the default collate (as ``bonedrr train`` reads by default,
     ``train.num_workers`` 0).

   Also the in-process read time per sample (``__getitems__`` of batches of 8, no DataLoader) and
   bytes per sample on disk.
2. The peer: the same samples written as per-sample NIfTI files (``.nii.gz``: radiograph crop, DRR
   channels, mask, overview; as a per-case layout would hold them) with the numbers and ids in a
   table held in memory, so an item is the same dict as a shard item; read in the same set-ups, so
   each ratio compares like with like. Each file is read whole and decompressed in one call
   (``Nifti1Image.from_bytes(gzip.decompress(...))``), the fastest way nibabel offers for a whole
   file; ``nib.load``'s in-process time is recorded beside it.
3. The consumer: the CPU training step rate of the project's own decomposition network and losses
   (``bonedrr.train``: the U-Net of config ``train.network``, L1 + gradient correlation, AdamW; batch 8
   at the crop size, torch 2 threads).

The files are in the page cache after the first epoch (as they are during training on a machine
with enough memory), so this measures decoding and the loader, not the disk. The machine's load
(other processes) is recorded: on a shared machine every rate is lower, the ratios less so. Each
rate is the best of 5 passes: on a shared 2-core virtual machine single passes vary by tens of
percent from run to run.

Usage:
    python benchmarks/shards.py [--results results/demo] [--out benchmarks/results/shards.json]
"""

from __future__ import annotations

import argparse
import gzip
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
from bonedrr.dataset import MappedBatchLoader, SharedBatchRing, ShardDataset  # noqa: E402
from bonedrr.shards import COMPRESSIONS, PackSettings, pack_cohort  # noqa: E402

BATCH = 8
#: DataLoader set-ups: name -> (worker processes, collate_fn; None: the default collate).
SETUPS = {"workers_2": (2, None), "workers_2_shard_collate": (2, ShardDataset.collate),
          "workers_2_batch_ring": (2, SharedBatchRing()), "workers_2_mapped": (2, MappedBatchLoader),
          "workers_0": (0, None)}
COLLATE_NAMES = {"workers_2": "default", "workers_2_shard_collate": "ShardDataset.collate",
                 "workers_2_batch_ring": "SharedBatchRing()", "workers_2_mapped": "MappedBatchLoader",
                 "workers_0": "default"}
IMAGES = ("xray", "drr", "mask", "overview")


class NiftiSamples(Dataset):
    """The peer: one folder per sample with xray.nii.gz, drr.nii.gz (C channels), mask.nii.gz and
    overview.nii.gz, and a table (in memory) of each sample's numbers and ids: the same item as a
    :class:`ShardDataset`'s.

    Args:
        folders: One folder per sample.
        table: Per sample, the item's entries that are not images.
        nib_load: Read with ``nib.load`` (format detection, streamed gzip) instead of the faster
            whole-file read.
    """

    def __init__(self, folders, table, nib_load: bool = False):
        self.folders, self.table, self.nib_load = list(folders), list(table), nib_load

    def __len__(self):
        return len(self.folders)

    def _read(self, path: Path) -> np.ndarray:
        import nibabel as nib

        image = nib.load(path) if self.nib_load else nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
        return np.asarray(image.dataobj, np.float32)

    def __getitem__(self, i):
        d = self.folders[i]
        item = {name: torch.from_numpy(self._read(d / f"{name}.nii.gz")) for name in IMAGES}
        for name in ("xray", "mask", "overview"):  # (1, H, W) as served
            item[name] = item[name][None]
        return item | self.table[i]


def write_nifti_peer(shards: ShardDataset, folder: Path) -> tuple[list[Path], list[dict]]:
    """The shard samples as NIfTI files, one folder each, and the table of their other entries."""
    import nibabel as nib

    folders, table = [], []
    for i in range(len(shards)):
        item = shards[i]
        d = folder / item["sample_id"]
        d.mkdir(parents=True)
        for name in IMAGES:
            array = item[name] if name == "drr" else item[name][0]  # (C, H, W); the others (H, W)
            nib.save(nib.Nifti1Image(array.numpy(), np.eye(4)), d / f"{name}.nii.gz")
        folders.append(d)
        table.append({k: v for k, v in item.items() if k not in IMAGES})
    return folders, table


def loader_rate(dataset, n_samples: int, workers: int, collate_fn=None, repeats: int = 5) -> float:
    """Samples per second of random access through a DataLoader (persistent workers, as in
    training): the best of ``repeats`` epochs of ``n_samples`` after a warm-up epoch (worker
    start-up, file opening and the page cache). The order is shuffled without replacement
    (successive permutations of the dataset, as shuffled epochs are)."""
    sampler = RandomSampler(dataset, num_samples=n_samples, generator=torch.Generator().manual_seed(0))
    if collate_fn is MappedBatchLoader:  # a loader of its own, not a collate_fn
        loader = MappedBatchLoader(dataset, BATCH, num_workers=workers, sampler=sampler, persistent_workers=True)
    else:
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, collate_fn=collate_fn)
    rates = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        count = sum(batch["xray"].shape[0] for batch in loader)
        if r:
            rates.append(count / (time.perf_counter() - t))
    return max(rates)


def loader_rates(dataset, n_samples: int) -> dict:
    """:func:`loader_rate` in each of :data:`SETUPS`."""
    return {name: round(loader_rate(dataset, n_samples, workers, collate_fn), 1)
            for name, (workers, collate_fn) in SETUPS.items()}


def read_ms(read_batch, n: int, n_samples: int, repeats: int = 5) -> float:
    """In-process milliseconds per sample of ``read_batch(indices)`` over shuffled batches of 8 (the
    best of ``repeats`` passes of ``n_samples``, after one pass that opens the files)."""
    generator = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-n_samples // n))])
    batches = order[:n_samples].split(BATCH)
    times = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        for b in batches:
            read_batch(b.tolist())
        times.append((time.perf_counter() - t) / n_samples * 1e3)
    return min(times[1:])


def check_same_batches(shards: ShardDataset, peer: NiftiSamples) -> None:
    """The peer serves exactly the shard's batches (so the comparison is of reading, not content)."""
    for collate in (torch.utils.data.default_collate, ShardDataset.collate):
        a, b = collate(shards.__getitems__(list(range(BATCH)))), collate([peer[i] for i in range(BATCH)])
        assert list(a) == list(b)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, b[key], rtol=0, atol=0, equal_nan=True)  # dtypes too
            else:
                assert value == b[key], key


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
           "torch": torch.__version__, "cases": len(cases), "batch": BATCH,
           "setups": {name: {"workers": w, "collate": COLLATE_NAMES[name]} for name, (w, c) in SETUPS.items()},
           "compressions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for compression in COMPRESSIONS:
            folder = tmp / compression
            t = time.perf_counter()
            manifest = pack_cohort(cases, folder, PackSettings(compression=compression), cohort="demo")
            pack_s = time.perf_counter() - t
            n = manifest["n_samples"]
            size = sum(s["bytes"] for s in manifest["shards"])
            dataset = ShardDataset(folder)
            out["compressions"][compression] = {
                "pack_s": round(pack_s, 2), "bytes_per_sample": round(size / n),
                "read_ms_per_sample": round(read_ms(dataset.__getitems__, n, args.samples), 3),
                "loader_samples_per_s": loader_rates(dataset, args.samples)}
            print(compression, out["compressions"][compression], flush=True)
        reference = ShardDataset(tmp / "lzf")
        out["samples"] = len(reference)
        out["crop_px"] = reference.manifest["crop_px"]
        out["channels"] = reference.channels
        folders, table = write_nifti_peer(reference, tmp / "nifti")
        peer, nib_load = NiftiSamples(folders, table), NiftiSamples(folders, table, nib_load=True)
        check_same_batches(reference, peer)
        out["nifti_peer"] = {
            "bytes_per_sample": round(sum(f.stat().st_size for d in folders for f in d.iterdir()) / len(folders)),
            "read_ms_per_sample": round(read_ms(lambda b: [peer[i] for i in b], len(folders), args.samples), 3),
            "read_ms_per_sample_nib_load": round(read_ms(lambda b: [nib_load[i] for i in b], len(folders),
                                                         args.samples), 3),
            "loader_samples_per_s": loader_rates(peer, args.samples)}
        print("nifti", out["nifti_peer"], flush=True)
    shape = tuple(out["crop_px"])
    stage_1 = len(load_config(REPO / "config" / "config.yaml")["train"]["stages"][0]["channels"])
    out["training"] = {
        "what": "the project's training step (bonedrr.train's U-Net at config/config.yaml's train.network, stage 1's "
                f"{stage_1} channels, L1 + GC, AdamW), batch 8, CPU, torch 2 threads",
        "samples_per_s": round(training_rate(shape, stage_1), 1)}
    print("training", out["training"], flush=True)
    train = out["training"]["samples_per_s"]
    nifti = out["nifti_peer"]
    for c in out["compressions"].values():
        c["x_nifti_read"] = round(nifti["read_ms_per_sample"] / c["read_ms_per_sample"], 1)
        # each set-up against the peer in the same set-up
        c["x_nifti"] = {k: round(v / nifti["loader_samples_per_s"][k], 1) for k, v in c["loader_samples_per_s"].items()}
        c["x_training"] = {k: round(v / train, 1) for k, v in c["loader_samples_per_s"].items()}
    # The choice, in each set-up: the smallest files among those that read at least 10x NIfTI and 5x
    # training; if none does, the fastest reader (size cannot buy back a loader that is too slow)
    out["chosen_compression"] = {}
    for setup in SETUPS:
        fast = {k: v for k, v in out["compressions"].items()
                if v["x_training"][setup] >= 5 and v["x_nifti"][setup] >= 10}
        out["chosen_compression"][setup] = (
            min(fast, key=lambda k: fast[k]["bytes_per_sample"]) if fast else
            max(out["compressions"], key=lambda k: out["compressions"][k]["loader_samples_per_s"][setup]))
    out["rule"] = ("per set-up: smallest bytes per sample among compressions reading >= 5x training and >= 10x NIfTI; "
                   "if none does, the fastest reader")
    out["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
