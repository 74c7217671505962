"""PyTorch access to packed shards (``bonedrr pack``; layout in docs/shards.md).

:class:`ShardDataset` serves one sample (one hip) per item, selected by fold, with the DRR channels a
model asks for; a ``DataLoader`` gets a batch's items in one call (``__getitems__``). HDF5 files are
opened lazily, once per process, so it is safe in a ``DataLoader`` with worker processes (each worker
opens its own handles after the fork). With worker processes, :class:`MappedBatchLoader` makes the
same batches as a ``DataLoader`` with the default collate, faster: a worker writes a batch into
shared memory that the main process mapped once and sends back only where it is
(benchmarks/shards.py). Where workers cannot fork, ``collate_fn=SharedBatchRing()`` does the same
through torch's own hand-over.

Example:
    >>> train = ShardDataset("results/demo/shards", exclude_folds=[0])          # doctest: +SKIP
    >>> loader = MappedBatchLoader(train, batch_size=8, shuffle=True, num_workers=2)  # doctest: +SKIP
    >>> batch = next(iter(loader))                                            # doctest: +SKIP
    >>> batch["drr"].shape                                                    # doctest: +SKIP
    torch.Size([8, 7, 128, 64])
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from bonedrr.errors import InputError


#: Byte alignment of each tensor in a batch made by :meth:`ShardDataset.collate` (a cache line).
_ALIGN = 64


def read_index(shard_dir: str | Path) -> list[dict]:
    """index.csv as a list of dicts (strings as written; see :data:`bonedrr.shards.INDEX_COLUMNS`)."""
    with open(Path(shard_dir) / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _float(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


class ShardDataset(Dataset):
    """Samples of a packed shard folder as tensors.

    Args:
        shard_dir: The folder with manifest.json, index.csv and the shards.
        folds: Keep only samples of these folds (None: all).
        exclude_folds: Then drop samples of these folds (e.g. the held-out fold).
        channels: DRR channels to serve, in this order (None: all, as packed).

    Attributes:
        channels: The served DRR channel names (list[str]).
        index: One dict per item: its row of index.csv.
        manifest: The folder's manifest.json.

    Item (a dict; the default collate stacks it): ``xray`` (1, H, W) radiograph crop as stored;
    ``drr`` (C, H, W) g/cm2; ``mask`` (1, H, W) proximal-femur projected bone (1 inside);
    ``overview`` (1, 128, 256); ``head_overview_px`` (2,) (row, col); ``drr_bmd``, ``qct_vbmd``,
    ``dxa_abmd`` floats (NaN when unknown); ``kvp`` float, the radiograph's tube voltage (NaN when its
    DICOM did not record it, or in shards packed before format 1.1); ``sample_id``, ``patient_id`` str;
    ``fold`` int.
    """

    def __init__(self, shard_dir: str | Path, folds: Sequence[int] | None = None,
                 exclude_folds: Sequence[int] | None = None, channels: Sequence[str] | None = None):
        self.shard_dir = Path(shard_dir)
        manifest_path = self.shard_dir / "manifest.json"
        if not manifest_path.is_file():
            raise InputError("no manifest.json: not a packed shard folder (or its pack did not finish)",
                             self.shard_dir)
        self.manifest = json.loads(manifest_path.read_text())
        major = str(self.manifest.get("format_version", "0")).split(".")[0]
        if major != "1":
            raise InputError(f"shard format {self.manifest.get('format_version')} is not supported (1.x)",
                             manifest_path)
        packed = list(self.manifest["channels"])
        self.channels = list(channels) if channels is not None else packed
        unknown = [c for c in self.channels if c not in packed]
        if unknown:
            raise InputError(f"unknown channel(s) {', '.join(unknown)} (packed: {', '.join(packed)})",
                             manifest_path)
        self._channel_idx = [packed.index(c) for c in self.channels]
        masks = list(self.manifest["masks"])
        self._mask_idx = masks.index("proximal_femur") if "proximal_femur" in masks else None
        rows = read_index(self.shard_dir)
        if folds is not None:
            rows = [r for r in rows if int(r["fold"]) in set(folds)]
        if exclude_folds is not None:
            rows = [r for r in rows if int(r["fold"]) not in set(exclude_folds)]
        self.index = rows
        self._files: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # open HDF5 handles never travel to worker processes
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _shard(self, name: str) -> dict:
        """A shard's image datasets (open handles) and its small per-sample arrays (read once), for
        this process."""
        import h5py

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            f = h5py.File(self.shard_dir / name, "r")
            shard = {key: f[key] for key in ("xray", "drr", "mask", "overview")}
            shard.update({key: f[key][...] for key in ("head_overview_px", "drr_bmd", "qct_vbmd", "dxa_abmd")})
            shard["kvp"] = f["kvp"][...] if "kvp" in f else np.full(len(shard["drr_bmd"]), np.nan)  # format 1.1
            shard["file"] = f
            self._files[name] = shard
        return self._files[name]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """The items of a batch of indices, read together.

        A ``DataLoader`` calls this with a whole batch (``__getitem__`` is the batch of one). The
        images are read into one array per key for the batch, the numbers come from the arrays that
        :meth:`_shard` keeps in memory, and each item's tensors are views of the batch's arrays.
        The items are those of ``[self[i] for i in indices]``, in that order, repeats included.

        Args:
            indices: Item indices (any order, repeats allowed; negative counts from the end).

        Returns:
            One item dict per index (see the class docstring).
        """
        rows = [self.index[i] for i in indices]  # IndexError as for a list
        if not rows:
            return []
        n = len(rows)
        first = self._shard(rows[0]["shard"])  # the shapes as stored (all shards of a pack share them)
        crop = first["xray"].shape[1:]
        xray = np.empty((n, 1, *crop), np.float32)
        drr = np.empty((n, len(self._channel_idx), *crop), np.float32)
        mask = np.zeros((n, 1, *crop), np.float32)
        overview = np.empty((n, 1, *first["overview"].shape[1:]), np.float32)
        head = np.empty((n, 2), np.float32)
        numbers = {key: np.empty(n) for key in ("drr_bmd", "qct_vbmd", "dxa_abmd", "kvp")}
        by_shard: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            by_shard.setdefault(row["shard"], []).append(position)
        for name, where in by_shard.items():
            shard = self._shard(name)
            shard_rows = [int(rows[p]["row"]) for p in where]
            head[where] = shard["head_overview_px"][shard_rows]
            for key, values in numbers.items():
                values[where] = shard[key][shard_rows]
            # Images row by row, straight into the batch: an h5py list selection (one call for the
            # batch) reads these chunked datasets many times slower than one call per row
            for p, r in zip(where, shard_rows):
                xray[p, 0] = shard["xray"][r]
                # a sample's DRR is one chunk: read all channels, then keep the served ones
                np.take(shard["drr"][r], self._channel_idx, axis=0, out=drr[p])
                if self._mask_idx is not None:
                    mask[p, 0] = shard["mask"][r][self._mask_idx]
                overview[p, 0] = shard["overview"][r]
        tensors = {key: torch.from_numpy(array).unbind(0) for key, array in
                   (("xray", xray), ("drr", drr), ("mask", mask), ("overview", overview), ("head_overview_px", head))}
        return [{**{key: t[j] for key, t in tensors.items()},
                 **{key: float(values[j]) for key, values in numbers.items()},
                 "sample_id": row["sample_id"], "patient_id": row["patient_id"], "fold": int(row["fold"])}
                for j, row in enumerate(rows)]

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        """The default collate's batch of ``items``, in one block of memory: a faster ``collate_fn``
        with worker processes.

        ``DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=ShardDataset.collate)`` yields
        the batches that the default collate would: the same keys, dtypes, shapes and values (tensors
        stacked, floats as float64 and ints as int64 tensors, strings as lists). What differs is
        where they live: in a worker process the default collate puts each key's tensor in its own
        shared-memory file, and the main process receives each file separately; here all tensors of
        the batch are views of one file, so a batch costs one transfer (measured in
        benchmarks/shards.py). The views keep the whole batch's memory alive: ``.clone()`` a small
        tensor that is kept for longer than the batch. :class:`SharedBatchRing` goes further and
        reuses the blocks.

        Args:
            items: Item dicts with the same keys (tensors of one shape per key, numbers, strings;
                anything that is not a tensor or a number is collected in a list).

        Returns:
            The batch, a dict.
        """
        in_worker = get_worker_info() is not None
        return collate_into(items, torch.UntypedStorage._new_shared if in_worker else torch.UntypedStorage)

    def kvp(self) -> np.ndarray:
        """Every item's tube voltage (kV; NaN when unknown), without opening a shard."""
        return self.targets("kvp")

    def targets(self, name: str = "drr_bmd_g_cm2") -> np.ndarray:
        """A target column of the index for every item (NaN when unknown), without opening a shard."""
        return np.array([_float(r.get(name)) for r in self.index])


def batch_layout(items: Sequence[dict]) -> tuple[dict, int]:
    """Where :meth:`ShardDataset.collate` puts each tensor of a batch of ``items`` in one block:
    ``({key: (dtype, shape, byte offset)}, block bytes)``; keys that are not numbers or tensors stay
    lists and are not in it."""
    n, first = len(items), items[0]
    layout, size = {}, 0
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            dtype, shape = value.dtype, (n, *value.shape)
        elif isinstance(value, bool):  # before int: a bool is an int
            dtype, shape = torch.bool, (n,)
        elif isinstance(value, float):
            dtype, shape = torch.float64, (n,)
        elif isinstance(value, int):
            dtype, shape = torch.int64, (n,)
        else:
            continue
        layout[key] = (dtype, shape, size)
        size += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return layout, size


def _views(block: torch.Tensor, layout: dict) -> dict:
    """The tensors of ``layout`` as views of ``block`` (uint8)."""
    return {key: block[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for key, (dtype, shape, offset) in layout.items()}


def _write(items: Sequence[dict], layout: dict, block: torch.Tensor) -> dict:
    """Write the batch of ``items`` into ``block`` as ``layout`` says; the batch (views of ``block``)."""
    views, first = _views(block, layout), items[0]
    batch = {}
    for key in first:
        values = [item[key] for item in items]
        if key not in views:
            batch[key] = values
        elif isinstance(first[key], torch.Tensor):
            batch[key] = torch.stack(values, out=views[key])
        else:
            batch[key] = views[key].copy_(torch.tensor(values, dtype=layout[key][0]))
    return batch


def collate_into(items: Sequence[dict], storage_of_size) -> dict:
    """:meth:`ShardDataset.collate`'s batch, written into ``storage_of_size(nbytes)`` (an
    ``UntypedStorage`` of at least ``nbytes`` bytes; the batch's tensors are views of it)."""
    layout, size = batch_layout(items)
    return _write(items, layout, torch.empty(0, dtype=torch.uint8).set_(storage_of_size(size)))


class SharedBatchRing:
    """A ``collate_fn`` for worker processes that reuses its shared memory: the batches of
    :meth:`ShardDataset.collate`, written into a ring of blocks that each worker cycles through.

    A worker process hands a batch to the main process in shared memory. Allocating a new block for
    every batch (what the default collate and :meth:`ShardDataset.collate` do) makes the kernel
    zero and map fresh pages in both processes, which on a small machine costs more than reading the
    samples (benchmarks/shards.py). Here each worker writes batch ``j`` into block ``j % depth`` of
    its own ring, so after the first pass over the ring no page is allocated again.

    The price is a lifetime: a worker rewrites a block ``depth`` of its batches later. With
    ``depth = prefetch_factor * num_workers + 2`` (the default) the DataLoader (which hands out at
    most ``prefetch_factor * num_workers`` batches ahead, and yields them in order) has by then
    yielded two further batches of that worker: a batch stays valid while you hold it and take the
    next one. ``.clone()`` what you keep longer (a running sum of ``batch["drr_bmd"]`` is fine, a
    list of batches is not). Requires the DataLoader's ``in_order=True`` (its default). In the main
    process (``num_workers=0``) it collates like :meth:`ShardDataset.collate`, without reuse.

    Args:
        prefetch_factor: The DataLoader's ``prefetch_factor`` (torch's default 2).
        depth: Blocks per worker (None: ``prefetch_factor * num_workers + 2``).

    Example:
        >>> from torch.utils.data import DataLoader                               # doctest: +SKIP
        >>> loader = DataLoader(ShardDataset("results/demo/shards"), batch_size=8,  # doctest: +SKIP
        ...                     num_workers=2, collate_fn=SharedBatchRing())
    """

    def __init__(self, prefetch_factor: int = 2, depth: int | None = None):
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.prefetch_factor, self.depth = int(prefetch_factor), depth
        self._ring: list[torch.UntypedStorage] = []
        self._next = 0
        self._pid: int | None = None

    def __getstate__(self):  # a worker starts with a ring of its own
        return {**self.__dict__, "_ring": [], "_next": 0, "_pid": None}

    def _storage(self, nbytes: int) -> torch.UntypedStorage:
        if self._pid != os.getpid():  # a forked worker must not write into its parent's blocks
            self._ring, self._next, self._pid = [], 0, os.getpid()
        depth = self.depth or self.prefetch_factor * get_worker_info().num_workers + 2
        slot = self._next % depth
        self._next += 1
        if slot < len(self._ring) and self._ring[slot].nbytes() >= nbytes:
            return self._ring[slot]
        storage = torch.UntypedStorage._new_shared(nbytes)
        if slot < len(self._ring):
            self._ring[slot] = storage
        else:
            self._ring.append(storage)
        return storage

    def __call__(self, items: Sequence[dict]) -> dict:
        if get_worker_info() is None:
            return collate_into(items, torch.UntypedStorage)
        return collate_into(items, self._storage)


def fork_available() -> bool:
    """Whether worker processes can be forked here (:class:`MappedBatchLoader` needs it)."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


class _MappedRing:
    """:class:`MappedBatchLoader`'s collate_fn: ``depth`` blocks of ``block_bytes`` per worker, mapped
    (shared, anonymous) by the main process and inherited by the forked workers."""

    def __init__(self, n_workers: int, depth: int, block_bytes: int):
        import mmap

        self.depth, self.block_bytes = depth, block_bytes
        self._maps = [mmap.mmap(-1, block_bytes, flags=mmap.MAP_SHARED) for _ in range(n_workers * depth)]
        self.blocks = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        for block in self.blocks:  # touch every page now, not while training
            block.zero_()
        # each worker's batch count, shared so that it survives the workers of one epoch: new workers
        # go on round their ring instead of rewriting the block of the batch still held
        self._counts_map = mmap.mmap(-1, 8 * n_workers, flags=mmap.MAP_SHARED)
        self.counts = torch.frombuffer(self._counts_map, dtype=torch.int64)
        self.counts.zero_()

    def __call__(self, items: Sequence[dict]) -> dict:
        """In a worker: write the batch into this worker's next block; return where it is."""
        worker = get_worker_info().id
        slot = worker * self.depth + int(self.counts[worker]) % self.depth
        self.counts[worker] += 1
        layout, size = batch_layout(items)
        if size > self.block_bytes:
            raise ValueError(f"a batch of {len(items)} samples needs {size} bytes, more than the "
                             f"{self.block_bytes} of a block: samples of different shapes?")
        batch = _write(items, layout, self.blocks[slot])
        return {"slot": slot, "layout": layout, "keys": list(batch),
                "lists": {k: v for k, v in batch.items() if k not in layout}}


class MappedBatchLoader:
    """A DataLoader whose worker processes hand over batches through shared memory mapped once.

    With :class:`SharedBatchRing` each batch still travels the way torch hands a shared tensor to
    another process: a file descriptor through a socket, then a fresh mapping in the main process.
    Here the main process maps a ring of ``depth`` blocks per worker once, before the workers start;
    the forked workers inherit the mappings, write batch ``j`` into their block ``j % depth``
    (:meth:`ShardDataset.collate`'s layout) and send back only the slot and the layout, a few hundred
    bytes. The batch you get is views of the main process's block, the same lifetime as
    :class:`SharedBatchRing`'s: valid while you hold it and take the next one (``depth =
    prefetch_factor * num_workers + 2``); ``.clone()`` what you keep longer.

    It needs the ``fork`` start method (Linux's default), in-order loading (the DataLoader's default),
    and batches no larger than the first ``batch_size`` items (the samples of a shard folder all have
    one shape). Without workers it is a plain DataLoader with :meth:`ShardDataset.collate`.

    Args:
        dataset: The dataset (items as :class:`ShardDataset`'s).
        batch_size: Samples per batch.
        num_workers: Worker processes.
        prefetch_factor: Batches each worker loads ahead (torch's default 2).
        **loader_kwargs: Passed to ``torch.utils.data.DataLoader`` (``shuffle``, ``sampler``,
            ``generator``, ``persistent_workers``, ...).

    Example:
        >>> loader = MappedBatchLoader(ShardDataset("results/demo/shards"), batch_size=8,  # doctest: +SKIP
        ...                            num_workers=2, shuffle=True)
        >>> for batch in loader:                                                          # doctest: +SKIP
        ...     step(batch["xray"], batch["drr"])
    """

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, prefetch_factor: int = 2,
                 **loader_kwargs):
        from torch.utils.data import DataLoader

        self.batch_size = int(batch_size)
        if num_workers == 0:
            self._blocks = []
            self.loader = DataLoader(dataset, batch_size, collate_fn=ShardDataset.collate, **loader_kwargs)
            return
        context = loader_kwargs.pop("multiprocessing_context", None) or "fork"
        if getattr(context, "get_start_method", lambda: context)() != "fork" or not fork_available():
            raise ValueError(f"MappedBatchLoader needs the fork start method, not {context!r} here: "
                             "use SharedBatchRing as the DataLoader's collate_fn instead")
        _, block_bytes = batch_layout([dataset[0]] * self.batch_size)
        # The collate_fn is an object of its own: a bound method of this loader would make a reference
        # cycle (loader -> DataLoader -> collate_fn -> loader) that keeps persistent workers alive until
        # a garbage collection, which may then run in another loader's forked worker.
        self._ring = _MappedRing(num_workers, prefetch_factor * num_workers + 2, block_bytes)
        self._blocks = self._ring.blocks
        self.loader = DataLoader(dataset, batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor,
                                 collate_fn=self._ring, multiprocessing_context="fork", **loader_kwargs)

    def __iter__(self):
        if not self._blocks:
            yield from self.loader
            return
        for handed in self.loader:
            views = _views(self._blocks[handed["slot"]], handed["layout"])
            yield {k: views[k] if k in views else handed["lists"][k] for k in handed["keys"]}

    def __len__(self) -> int:
        return len(self.loader)
