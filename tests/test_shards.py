"""BMD targets and training shards on two small virtual patients (true pose, so no registration here;
the PHI test in test_shards_phi.py runs the whole chain with registration)."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.interpolate import RegularGridInterpolator

from bonedrr.bmd import drr_bmd
from bonedrr.shards import CHANNELS, PackSettings, fold_of, pack_cohort, sha256_of, verify

from conftest import REPO

pytestmark = pytest.mark.slow
PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200, 400, 800]}


def make_case(folder, demo_dir, truth, settings, case_id, out):
    """ingest, calibrate, pose = the true one (converged), drr, bmd: a case as the workflow leaves it."""
    from bonedrr.bmd import bmd_case
    from bonedrr.drr import render_case, write_drr
    from bonedrr.calibrate import calibrate_case
    from bonedrr.geometry import Geometry
    from bonedrr.images import write_json
    from bonedrr.ingest import ingest_case

    files = truth["files"]
    src = demo_dir / truth["case_id"]
    ingest_case(case_id, src / files["ct"], src / files["xray"], out, pixel_mm=settings.pixel_mm,
                sdd_mm=settings.sdd_mm, clinical=truth["clinical"] | {"patient_id": f"p_{case_id}"})
    shutil.copy(src / "labels.nii.gz", out / "labels.nii.gz")
    calibrate_case(out / "ct.nii.gz", out / "labels.nii.gz", out, PHANTOM)
    write_json(out / "pose.json", {"world_to_camera": truth["geometry"]["world_to_camera"],
                                   "geometry": truth["geometry"], "similarity_value": 0.7, "converged": True,
                                   "qa_flags": []})
    write_drr(out / "drr.h5", render_case(out / "density.nii.gz", out / "labels.nii.gz",
                                          Geometry.from_dict(truth["geometry"]), device="cpu"))
    bmd_case(out / "density.nii.gz", out / "labels.nii.gz", out / "drr.h5", out / "case.json", out / "bmd.json",
             calibration_json=out / "calibration.json")
    return out


@pytest.fixture(scope="module")
def cohort(demo_cases, tmp_path_factory):
    demo_dir, settings, truths = demo_cases
    root = tmp_path_factory.mktemp("cohort")
    for truth in truths:
        make_case(root, demo_dir, truth, settings, truth["case_id"], root / truth["case_id"])
    return root, truths


# 2.8 mm radiograph pixels kept (zoom 1: no prefilter), so the test's own bilinear crop is exact.
SETTINGS = dict(crop_mm=(179.2, 89.6), crop_px=(64, 32), folds=5, seed=0, compression="gzip-4")


@pytest.fixture(scope="module")
def packed(cohort):
    root, truths = cohort
    out = root / "shards"
    # 2 samples a shard: two shards for the two cases
    manifest = pack_cohort([root / t["case_id"] for t in truths], out, PackSettings(shard_size_mb=0.45, **SETTINGS),
                           cohort="tiny")
    return out, manifest


def read_index(folder):
    with open(folder / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_drr_bmd_definition():
    image = np.zeros((4, 5), np.float32)
    image[1:3, 1:4] = [[0.04, 0.5, 0.7], [0.9, 1.1, 0.03]]
    assert drr_bmd(image) == pytest.approx((0.5 + 0.7 + 0.9 + 1.1) / 4)
    assert drr_bmd(image, threshold_g_cm2=0.8) == pytest.approx(1.0)
    assert math.isnan(drr_bmd(image, threshold_g_cm2=2.0))


def test_bmd_targets_match_the_demo_truth(cohort):
    root, truths = cohort
    for truth in truths:
        record = json.loads((root / truth["case_id"] / "bmd.json").read_text())
        assert set(record["sides"]) == {"left", "right"}
        for side, s in record["sides"].items():
            assert s["qct_vbmd_mg_cm3"] == pytest.approx(truth["qct_vbmd_mg_cm3"][side], rel=0.02)
            # DRR-BMD at 2.8 mm pixels against the simulated (parallel-beam) DXA: a few percent
            assert s["drr_bmd_g_cm2"] == pytest.approx(truth["dxa_abmd_noiseless_g_cm2"][side], rel=0.05)
            # DRR-vBMD (mineral over volume, from the DRR and the thickness) against QCT's mean of the
            # same region: a few % above, as the rendered density clips bone voxels at 0
            assert s["drr_vbmd_mg_cm3"] == pytest.approx(truth["qct_vbmd_mg_cm3"][side] * 1.04, rel=0.06)
            assert s["dxa_abmd_g_cm2"] == truth["clinical"][f"dxa_abmd_{side}"]
            # the projected femoral head lies on the femur's side of the image
            cols = truth["geometry"]["cols"]
            assert (s["femoral_head_px"][1] > cols / 2) == (side == "left")


def crop_independently(image, box, shape):
    """Bilinear samples of ``image`` at the pixel centres of ``box`` (top, left, bottom, right)."""
    top, left, bottom, right = box
    h, w = shape
    rows = top + (np.arange(h) + 0.5) * (bottom - top) / h
    cols = left + (np.arange(w) + 0.5) * (right - left) / w
    interp = RegularGridInterpolator((np.arange(image.shape[0]), np.arange(image.shape[1])), image,
                                     bounds_error=False, fill_value=0.0)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return interp(np.stack([rr, cc], -1))


def test_round_trip_values_attributes_checksums(cohort, packed):
    from bonedrr.drr import read_drr

    root, truths = cohort
    out, manifest = packed
    assert verify(out) == []
    assert [s["n_samples"] for s in manifest["shards"]] == [2, 2]
    for s in manifest["shards"]:
        assert sha256_of(out / s["file"]) == s["sha256"]
    index = read_index(out)
    assert [r["sample_id"] for r in index] == ["demo_000_left", "demo_000_right", "demo_001_left", "demo_001_right"]
    for r in index:
        case = root / r["case_id"]
        drr = read_drr(case / "drr.h5")
        xray = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "xray.nii.gz"))).astype(np.float64)
        with h5py.File(out / r["shard"], "r") as f:
            i = int(r["row"])
            assert f.attrs["format_version"] == "1.2" and json.loads(f.attrs["channels"]) == list(CHANNELS)
            assert f["drr"].chunks == (1, len(CHANNELS), 64, 32) and f["drr"].compression == "gzip"
            assert f["sample_id"][i].decode() == r["sample_id"] and f["patient_id"][i].decode() == f"p_{r['case_id']}"
            box, side = f["crop_box_px"][i], r["side"]
            flip = (lambda a: a[:, ::-1]) if side == "left" else (lambda a: a)
            assert bool(f["mirrored"][i]) == (side == "left")
            # the left hip is the plain crop of its box, mirrored; every channel of its own side
            for c, name in enumerate(CHANNELS):
                source = (f"{name}_{side}" if name in ("proximal_femur", "femur", "hip", "proximal_femur_thickness")
                          else name)
                expected = flip(crop_independently(drr["drr"][drr["channels"].index(source)], box, (64, 32)))
                np.testing.assert_allclose(f["drr"][i, c], expected, atol=1e-4)
            np.testing.assert_allclose(f["xray"][i], flip(crop_independently(xray, box, (64, 32))), rtol=1e-5,
                                       atol=1e-3)
            pf = f["drr"][i, 0]
            assert f["drr_bmd"][i] == pytest.approx(drr_bmd(pf)) and float(r["drr_bmd_g_cm2"]) == pytest.approx(
                f["drr_bmd"][i], rel=1e-5)
            np.testing.assert_array_equal(f["mask"][i, 0], pf > 0.05)
            np.testing.assert_allclose(f["pixel_mm"][i], [2.8, 2.8])
            # the head sits where the settings put it, and the box is 179.2 x 89.6 mm
            bmd = json.loads((case / "bmd.json").read_text())["sides"][side]
            hr, hc = bmd["femoral_head_px"]
            assert box[2] - box[0] == pytest.approx(64) and box[3] - box[1] == pytest.approx(32)
            assert hr - box[0] == pytest.approx(0.3 * 64, abs=1e-3)
            assert (hc - box[1]) == pytest.approx(0.7 * 32 if side == "right" else 0.3 * 32, abs=1e-3)
            truth = next(t for t in truths if t["case_id"] == r["case_id"])
            assert f["qct_vbmd"][i] == pytest.approx(truth["qct_vbmd_mg_cm3"][side], rel=0.02)
            # the radiograph's tube voltage, from its DICOM header through case.json
            assert f["kvp"][i] == truth["exposure"]["kvp"] == float(r["kvp"])
            assert f["fold"][i] == fold_of(f"p_{r['case_id']}", 5, 0) == int(r["fold"])


def test_dataset_and_dataloader(packed):
    import torch
    from torch.utils.data import DataLoader

    from bonedrr.dataset import ShardDataset

    out, _ = packed
    everything = ShardDataset(out)
    assert len(everything) == 4 and everything.channels == list(CHANNELS)
    some = ShardDataset(out, channels=["bone", "proximal_femur"])
    item = some[3]
    with h5py.File(out / some.index[3]["shard"], "r") as f:
        row = int(some.index[3]["row"])
        np.testing.assert_array_equal(item["drr"].numpy(), f["drr"][row][[4, 0]])
        np.testing.assert_array_equal(item["mask"][0].numpy(), f["mask"][row, 0])
    assert item["overview"].shape == (1, 128, 256) and item["head_overview_px"].shape == (2,)
    folds = {r["fold"] for r in everything.index}
    held = int(sorted(folds)[0])
    train = ShardDataset(out, exclude_folds=[held])
    assert all(int(r["fold"]) != held for r in train.index)
    assert len(train) + len(ShardDataset(out, folds=[held])) == 4
    batches = list(DataLoader(everything, batch_size=2, shuffle=True, num_workers=2))
    assert sorted(sum((b["sample_id"] for b in batches), [])) == sorted(r["sample_id"] for r in everything.index)
    assert batches[0]["drr"].shape == (2, len(CHANNELS), 64, 32) and batches[0]["drr_bmd"].dtype == torch.float64


def item_from_the_file(folder, row, channels):
    """One item as ShardDataset should serve it, read with h5py alone (docs/shards.md)."""
    with h5py.File(folder / row["shard"], "r") as f:
        i = int(row["row"])
        packed, masks = json.loads(f.attrs["channels"]), json.loads(f.attrs["masks"])
        return {"xray": f["xray"][i][None], "drr": f["drr"][i][[packed.index(c) for c in channels]],
                "mask": f["mask"][i, masks.index("proximal_femur")][None].astype(np.float32),
                "overview": f["overview"][i][None], "head_overview_px": f["head_overview_px"][i],
                "drr_bmd": float(f["drr_bmd"][i]), "qct_vbmd": float(f["qct_vbmd"][i]),
                "dxa_abmd": float(f["dxa_abmd"][i]), "kvp": float(f["kvp"][i]), "sample_id": row["sample_id"],
                "patient_id": row["patient_id"], "fold": int(row["fold"])}


def assert_same(a, b):
    """Equal items or batches: the same keys in the same order, and for tensors the same dtype,
    shape and values (NaN equal to NaN)."""
    import torch

    assert list(a) == list(b)
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and value.dtype == other.dtype and value.shape == other.shape, key
            np.testing.assert_array_equal(value.numpy(), other.numpy(), err_msg=key)
        else:
            assert type(value) is type(other), key
            np.testing.assert_equal(value, other, err_msg=key)


def test_batched_reads_are_the_item_reads(packed):
    import torch
    from torch.utils.data import default_collate

    from bonedrr.dataset import ShardDataset

    out, _ = packed
    folds = sorted({int(r["fold"]) for r in read_index(out)})
    for kwargs in ({}, {"channels": ["bone", "proximal_femur"]}, {"folds": [folds[0]]},
                   {"exclude_folds": [folds[0]], "channels": ["muscle"]}):
        dataset = ShardDataset(out, **kwargs)
        channels = kwargs.get("channels", list(CHANNELS))
        n = len(dataset)
        shards = {r["shard"] for r in dataset.index}
        # out of order, repeated, from the end, and (on the whole folder) across both shards
        for indices in ([n - 1, 0, 1 % n, n - 1], [0, 0, 0], [-1, -n], list(range(n))[::-1]):
            items = dataset.__getitems__(indices)
            assert len(items) == len(indices)
            for i, item in zip(indices, items):
                assert_same(item, dataset[i])
                expected = item_from_the_file(out, dataset.index[i], channels)
                assert_same(item, {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                   for k, v in expected.items()})
            # the faster collate makes the default collate's batch
            assert_same(ShardDataset.collate(items), default_collate(items))
        if not kwargs:
            assert shards == {"shard_00000.h5", "shard_00001.h5"}
    assert ShardDataset(out).__getitems__([]) == []
    with pytest.raises(IndexError):
        ShardDataset(out).__getitems__([0, 4])


def test_worker_processes_give_the_batches_of_the_main_process(packed):
    from torch.utils.data import DataLoader

    from bonedrr.dataset import ShardDataset

    out, _ = packed
    dataset = ShardDataset(out, channels=["proximal_femur", "pelvis"])
    order = [3, 0, 3, 1, 2, 2, 0, 1, 1]  # both shards, repeats; batches of 3, 3, 2, 1
    runs = {(workers, collate): list(DataLoader(dataset, batch_size=3, sampler=order, num_workers=workers,
                                                collate_fn=collate))
            for workers in (0, 2) for collate in (None, ShardDataset.collate)}
    reference = runs[0, None]
    assert [b["sample_id"] for b in reference] == [[dataset.index[i]["sample_id"] for i in order[k:k + 3]]
                                                   for k in range(0, len(order), 3)]
    for batches in runs.values():
        assert len(batches) == len(reference)
        for batch, expected in zip(batches, reference):
            assert_same(batch, expected)
    # from a worker, ShardDataset.collate's batch is one block of shared memory
    for batch in runs[2, ShardDataset.collate]:
        storage = batch["drr"].untyped_storage()
        assert storage.is_shared() and all(batch[k].untyped_storage().data_ptr() == storage.data_ptr()
                                           for k in ("xray", "mask", "overview", "drr_bmd", "fold"))


def test_a_shared_batch_ring_reuses_its_blocks_and_keeps_the_held_batch_intact(packed):
    import os

    import torch
    from torch.utils.data import DataLoader

    from bonedrr.dataset import SharedBatchRing, ShardDataset

    out, _ = packed
    dataset = ShardDataset(out, channels=["proximal_femur", "bone"])
    order = torch.randint(len(dataset), (33,), generator=torch.Generator().manual_seed(0)).tolist()  # 11 batches
    reference = list(DataLoader(dataset, batch_size=3, sampler=order))
    ring = SharedBatchRing()
    loader = DataLoader(dataset, batch_size=3, sampler=order, num_workers=2, collate_fn=ring,
                        persistent_workers=True)
    blocks = []
    for _ in range(2):  # two epochs: the workers' rings persist and wrap around
        held = None
        for k, batch in enumerate(loader):
            assert_same(batch, reference[k])
            if held is not None:  # the batch before, held while this one was taken, is intact
                assert_same(held, reference[k - 1])
            held = batch
            fd, _ = batch["drr"].untyped_storage()._share_fd_cpu_()
            blocks.append(os.fstat(fd).st_ino)
    # 22 batches from 2 workers with rings of 2 * 2 + 2 blocks each: 12 blocks, reused
    assert len(blocks) == 2 * len(reference) == 22
    assert len(set(blocks)) == 12
    # in the main process it is the plain collate (no worker: nothing to hand over)
    assert_same(ring(dataset.__getitems__([0, 1])), ShardDataset.collate(dataset.__getitems__([0, 1])))
    with pytest.raises(ValueError, match="depth must be at least 1, not 0"):
        SharedBatchRing(depth=0)


def test_mapped_batch_loader_hands_over_the_same_batches_through_blocks_mapped_once(packed):
    import torch
    from torch.utils.data import DataLoader

    from torch.utils.data import RandomSampler

    from bonedrr.dataset import MappedBatchLoader, ShardDataset

    out, _ = packed
    dataset = ShardDataset(out, channels=["proximal_femur", "bone"])
    order = torch.randint(len(dataset), (33,), generator=torch.Generator().manual_seed(0)).tolist()  # 11 batches
    reference = list(DataLoader(dataset, batch_size=3, sampler=order))
    loader = MappedBatchLoader(dataset, batch_size=3, num_workers=2, sampler=order, persistent_workers=True)
    blocks = {int(b.data_ptr()) for b in loader._blocks}
    used = []
    for _ in range(2):  # two epochs: the workers go round their rings
        held = None
        for k, batch in enumerate(loader):
            assert_same(batch, reference[k])
            if held is not None:  # the batch before, held while this one was taken, is intact
                assert_same(held, reference[k - 1])
            held = batch
            used.append(batch["xray"].data_ptr())
    # every batch is a view of the main process's own blocks: 2 workers x (2 * 2 + 2), all reused
    assert len(used) == 22 and set(used) <= blocks and len(set(used)) == len(blocks) == 12
    assert len(loader) == 11

    # short epochs with new workers each time: the rings go on where the last epoch's workers stopped,
    # so the last batch of an epoch survives the first of the next
    def short_epochs():  # 3 batches an epoch, other samples in each
        return RandomSampler(dataset, replacement=True, num_samples=9, generator=torch.Generator().manual_seed(1))

    expected_epochs = DataLoader(dataset, batch_size=3, sampler=short_epochs())
    reference = [list(expected_epochs) for _ in range(4)]
    loader = MappedBatchLoader(dataset, batch_size=3, num_workers=2, sampler=short_epochs())
    held = None
    for epoch in range(4):
        for k, batch in enumerate(loader):
            assert_same(batch, reference[epoch][k])
            if held is not None:
                assert_same(held[0], reference[held[1]][held[2]])
            held = (batch, epoch, k)

    # without workers: ShardDataset.collate in the main process
    plain = MappedBatchLoader(dataset, batch_size=3, sampler=order)
    for batch, expected in zip(plain, DataLoader(dataset, batch_size=3, sampler=order)):
        assert_same(batch, expected)
    with pytest.raises(ValueError, match="MappedBatchLoader needs the fork start method, not 'spawn' here"):
        MappedBatchLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="spawn")


def test_overview_holds_the_whole_radiograph_and_the_head(cohort, packed):
    root, _ = cohort
    out, _ = packed
    with h5py.File(out / "shard_00000.h5", "r") as f:  # demo_000: left then right
        left, right = f["overview"][0], f["overview"][1]
        np.testing.assert_array_equal(left, right[:, ::-1])
        # 96 x 160 pixels of 2.8 mm fit 128 x 256 by height (2.1 mm overview pixels): 213 columns, centred
        assert not right[:, :20].any() and not right[:, -20:].any() and (right[:, 24:232] != 0).mean() > 0.9
        heads = json.loads((root / "demo_000" / "bmd.json").read_text())["sides"]
        for i, side in ((0, "left"), (1, "right")):
            (hr, hc), (r, c) = f["head_overview_px"][i], heads[side]["femoral_head_px"]
            col = ((c + 0.5) * 2.8 - 80 * 2.8) / 2.1 + 127.5
            assert hr == pytest.approx((r + 0.5) * 2.8 / 2.1 - 0.5, abs=1e-3)
            assert hc == pytest.approx(col if side == "right" else 255 - col, abs=1e-3)
            assert hc < 128  # the hip's own side of the (mirrored) image


def test_folds_are_stable_and_patient_disjoint(cohort, tmp_path):
    root, truths = cohort
    first = pack_cohort([root / "demo_000"], tmp_path / "a", PackSettings(**SETTINGS))
    # a second radiograph of patient p_demo_000, and another patient: the old case keeps its fold
    for name, patient in (("demo_000b", "p_demo_000"), ("demo_001", None)):
        if patient:
            shutil.copytree(root / "demo_000", tmp_path / name)
            record = json.loads((tmp_path / name / "case.json").read_text())
            (tmp_path / name / "case.json").write_text(json.dumps(record | {"case_id": name}))
        else:
            shutil.copytree(root / name, tmp_path / name)
    second = pack_cohort([root / "demo_000", tmp_path / "demo_000b", tmp_path / "demo_001"], tmp_path / "b",
                         PackSettings(**SETTINGS))
    assert first["n_samples"] == 2 and second["n_samples"] == 6
    a, b = read_index(tmp_path / "a"), read_index(tmp_path / "b")
    fold_of_sample = {r["sample_id"]: r["fold"] for r in b}
    assert all(fold_of_sample[r["sample_id"]] == r["fold"] for r in a)
    assert fold_of_sample["demo_000b_left"] == fold_of_sample["demo_000_left"]
    splits = json.loads((tmp_path / "b" / "splits.json").read_text())
    owners = [k for k, v in splits["folds"].items() if "p_demo_000" in v["patients"]]
    assert len(owners) == 1 and len(splits["folds"][owners[0]]["samples"]) == 4
    # the hash spreads patients evenly: 2000 patients in 5 folds, each within 10 % of 400
    counts = np.bincount([fold_of(f"patient_{i}", 5, 11) for i in range(2000)], minlength=5)
    assert counts.min() > 360 and counts.max() < 440


def test_failed_cases_are_excluded_with_their_reason(cohort, tmp_path):
    root, _ = cohort
    bad = shutil.copytree(root / "demo_001", tmp_path / "failed_reg")
    pose = json.loads((bad / "pose.json").read_text())
    (bad / "pose.json").write_text(json.dumps(pose | {"converged": False, "qa_flags": ["low_similarity"]}))
    unfinished = shutil.copytree(root / "demo_001", tmp_path / "no_bmd")
    (unfinished / "bmd.json").unlink()
    manifest = pack_cohort([root / "demo_000", bad, unfinished], tmp_path / "shards", PackSettings(**SETTINGS))
    assert manifest["n_samples"] == 2 and manifest["n_excluded"] == 2
    assert (tmp_path / "shards" / "excluded.tsv").read_text().splitlines() == [
        "case_id\tside\treason",
        "failed_reg\tboth\tregistration failed its QA (low_similarity)",
        "no_bmd\tboth\tmissing bmd.json (a stage failed or has not run)"]
    assert {r["case_id"] for r in read_index(tmp_path / "shards")} == {"demo_000"}


def test_a_failed_pack_leaves_the_previous_shards_and_nothing_half_written(cohort, packed, tmp_path):
    root, truths = cohort
    out = tmp_path / "shards"
    shutil.copytree(packed[0], out)
    before = {p.name: sha256_of(p) for p in out.iterdir()}
    broken = shutil.copytree(root / "demo_001", tmp_path / "zz_broken")  # packed after demo_000's shard
    data = (broken / "drr.h5").read_bytes()
    (broken / "drr.h5").write_bytes(data[: len(data) // 2])  # a truncated file: unreadable, not missing
    result = subprocess.run([sys.executable, "-m", "bonedrr", "pack", "--cases", str(root / "demo_000"),
                             str(broken), "--out", str(out), "--shard-size-mb", "0.1", "--crop-px", "64", "32"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"bonedrr pack: error: {re.escape(str(broken / 'drr.h5'))}: cannot read DRR \(.+\)", last)
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "zz_broken"]  # no temporary folder left


def test_the_format_document_example_reads_a_packed_folder(packed):
    out, _ = packed
    text = (REPO / "docs" / "shards.md").read_text()
    code = re.search(r"## Reading with h5py alone\n\n```python\n(.*?)```", text, re.S).group(1)
    assert 'shard_dir = Path("results/demo/shards")' in code
    code = code.replace('Path("results/demo/shards")', f"Path({str(out)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"demo_00\d_(left|right): crop \(64, 32\), DRR-BMD \d\.\d{3} g/cm2 over \d+ pixels\n",
                        result.stdout)


def test_format_document_names_every_dataset_and_attribute(packed):
    out, _ = packed
    text = (REPO / "docs" / "shards.md").read_text()
    with h5py.File(out / "shard_00000.h5", "r") as f:
        for name in list(f.keys()) + list(f.attrs.keys()):
            assert f"`{name}`" in text, name
    for column in read_index(out)[0]:
        assert column in text, column
