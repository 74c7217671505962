"""The workflow itself, run by Snakemake's CLI on a tiny configuration in a temporary folder."""

import gzip
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from bonedrr.dicom import write_radiograph_dicom

from conftest import PHI, REAL_CT, REPO, tiny_workflow_config

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two cohorts: a tiny demo, and a sample-sheet cohort with the real CT and one bad case."""
    d = tmp_path_factory.mktemp("workflow")
    data = d / "data"
    data.mkdir()
    stored = np.tile(np.arange(64, dtype=np.uint16) * 60, (48, 1))
    write_radiograph_dicom(data / "real.dcm", stored, (0.5, 0.5), 1100, 900, PHI, key="w", bits_stored=12)
    (d / "real.tsv").write_text("case_id\tct\txray\tside\tdxa_abmd_right\n"
                                f"real_1\t{REAL_CT}\tdata/real.dcm\tright\t0.83\n"
                                "swapped\tdata/real.dcm\tdata/real.dcm\tleft\t\n")
    config = tiny_workflow_config()
    config["cohorts"]["real"] = {"samples": "real.tsv", "calibration": {"method": "internal"}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


@pytest.fixture(scope="module")
def run(workdir):
    return snakemake(workdir)


def test_dry_run_shows_the_dag(workdir):
    result = snakemake(workdir, "-n")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    # before the ingest checkpoints run, the DAG holds them and what does not depend on their outcome
    for rule, count in (("demo_patient", 2), ("demo_samplesheet", 1), ("ingest_check", 4), ("case_outcome", 4),
                        ("failures", 2)):
        assert any(line.split()[:2] == [rule, str(count)] for line in out.splitlines()), out


def test_a_step_asked_for_alone_schedules_every_cases_checkpoint_at_once(workdir):
    """Input functions that iterate over the cases meet their checkpoints one at a time; without the
    ``checkpoint_statuses`` input naming them all, this DAG held one ingest check (one job per update)."""
    result = snakemake(workdir, "-n", "results/validation/tiny/report.html")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert any(line.split()[:2] == ["ingest_check", "2"] for line in out.splitlines()), out


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_run_makes_every_case_and_reports_the_bad_one(workdir, run):
    # The bad case is recorded, with its reason, and left out; every other case completes.
    assert run.returncode == 0, run.stderr[-3000:]
    results = workdir / "results"
    for cohort, case in (("tiny", "demo_000"), ("tiny", "demo_001"), ("real", "real_1")):
        record = json.loads((results / cohort / case / "case.json").read_text())
        assert record["case_id"] == case and record["cohort"] == cohort
    assert (results / "tiny" / "demo_input" / "samples.tsv").read_text().count("\n") == 3
    assert sorted(p.name for p in (results / "real" / "swapped").iterdir()) == ["outcome.json", "status"]
    log = (results / "real" / "logs" / "ingest" / "swapped.log").read_text().strip().splitlines()
    assert log[-1] == f"bonedrr ingest: error: {workdir / 'data' / 'real.dcm'}: modality is DX, not CT"
    assert (results / "real" / "qc" / "failures.tsv").read_text() == (
        "case_id\tstage\treason\nswapped\tingest\treal.dcm: modality is DX, not CT\n")
    assert json.loads((results / "real" / "real_1" / "outcome.json").read_text())["ok"] is True
    assert (results / "tiny" / "qc" / "failures.tsv").read_text() == "case_id\tstage\treason\n"
    assert not list(results.rglob(".staged")) and not list(results.rglob(".*.tmp-*"))
    real = json.loads((results / "real" / "real_1" / "case.json").read_text())
    assert real["side"] == "right" and real["clinical"] == {"dxa_abmd_right": 0.83}
    demo = json.loads((results / "tiny" / "demo_000" / "case.json").read_text())
    truth = json.loads((results / "tiny" / "demo_input" / "demo_000" / "truth.json").read_text())
    assert demo["clinical"]["dxa_abmd_left"] == truth["clinical"]["dxa_abmd_left"]
    assert json.loads((results / "tiny" / "demo_001" / "case.json").read_text())["xray"]["pixel_mm"] == [5.6, 5.6]


def test_demo_cases_are_calibrated_and_rendered(workdir, run):
    from bonedrr.drr import read_drr

    for case in ("demo_000", "demo_001"):
        folder = workdir / "results" / "tiny" / case
        truth = json.loads((workdir / "results" / "tiny" / "demo_input" / case / "truth.json").read_text())
        calibration = json.loads((folder / "calibration.json").read_text())
        assert calibration["method"] == "phantom"
        for side in ("left", "right"):
            assert abs(calibration["qct_vbmd_mg_cm3"][side] / truth["qct_vbmd_mg_cm3"][side] - 1) < 0.02
        drr = read_drr(folder / "drr.h5")
        assert drr["drr"].shape == (len(drr["channels"]), 48, 80) and drr["units"] == "g/cm2"
        pose = json.loads((folder / "pose.json").read_text())
        assert drr["geometry"] == pose["geometry"]  # rendered at the registered pose
        assert (folder / "overlay.png").exists()
        assert (folder / "drr.png").stat().st_size > 5_000 and (folder / "calibration.png").exists()


def test_segmenter_is_trained_and_segments_every_demo_case(workdir, run):
    results = workdir / "results" / "tiny"
    training = json.loads((results / "segmenter" / "model" / "training.json").read_text())
    assert training["cases"] == ["demo_000"] and training["nnunet"]["trainer"] == "nnUNetTrainerBonedrr"
    assert not (results / "segmenter" / "work").exists()  # nnU-Net's raw and preprocessed data are removed
    lines = (results / "qc" / "segmentation.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert [(r["case_id"], r["split"], r["labels_downstream"]) for r in rows] == [
        ("demo_000", "train", "reference"), ("demo_001", "test", "reference")]
    assert all(0.0 <= float(r["dice_femur_left"]) <= 1.0 for r in rows)
    for case in ("demo_000", "demo_001"):
        assert (results / case / "segmentation.png").stat().st_size > 10_000
        record = json.loads((results / case / "segmentation.json").read_text())
        assert record["device"] == "cpu" and "femur_left" in record["metrics"]
    assert (results / "qc" / "segmentation.png").is_file() and (results / "qc" / "segmenter_training.png").is_file()


def test_model_is_trained_on_the_cohort_with_shards(workdir, run):
    from bonedrr.model.portable import portable_path
    from bonedrr.train import load_model

    folder = workdir / "results" / "models" / "tiny_all"
    model = load_model(folder)
    assert model.channels == ["pelvis", "femur", "bone", "muscle", "proximal_femur"]
    assert model.info["n_train"] == 4  # both hips of both patients
    log = (folder / "train_log.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in log[1:]] == ["stage1"] * 2 + ["stage2"] * 2 + ["locator"]
    assert (folder / "curves.png").stat().st_size > 10_000 and (folder / "checkpoint.pt").is_file()
    assert not (workdir / "results" / "models" / "real_all").exists()  # no labels, no shards, no model
    # Snakemake touched model.pt when the job ended; its torch-free twin is still the one `estimate` uses
    assert portable_path(folder) == folder / "model.npz"
    assert (folder / "model.pt").stat().st_mtime_ns > (folder / "model.npz").stat().st_mtime_ns


def test_registration_table_lists_errors_against_truth(workdir, run):
    lines = (workdir / "results" / "tiny" / "qc" / "registration.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert [r["case_id"] for r in rows] == ["demo_000", "demo_001"]
    for r in rows:  # 5.6 mm pixels in this tiny run: a few mm at most
        assert float(r["mpd_mm"]) < 3.0 and float(r["rotation_error_deg"]) < 3.0


def test_tiny_demo_is_packed_into_shards(workdir, run):
    from bonedrr.dataset import ShardDataset
    from bonedrr.shards import CHANNELS, FORMAT_VERSION, verify

    results = workdir / "results" / "tiny"
    bmd = (results / "qc" / "bmd.tsv").read_text().splitlines()
    assert len(bmd) == 5 and bmd[0].startswith("case_id\tside\tdrr_bmd_g_cm2")
    shards = results / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["crop_px"] == [64, 32] and manifest["format_version"] == FORMAT_VERSION and verify(shards) == []
    excluded = (shards / "excluded.tsv").read_text().splitlines()[1:]
    hips_out = sum(2 if line.split("\t")[1] == "both" else 1 for line in excluded)
    assert manifest["n_samples"] >= 2 and manifest["n_samples"] + hips_out == 4
    dataset = ShardDataset(shards)
    assert len(dataset) == manifest["n_samples"] and dataset[0]["drr"].shape == (len(CHANNELS), 64, 32)
    # every radiograph's tube voltage, the PNG's from the sample sheet's xray_kvp
    assert set(dataset.kvp()) <= {70.0, 75.0, 80.0, 85.0}
    assert not (workdir / "results" / "real" / "shards").exists()  # no case of it reaches the DRRs yet


def test_validation_metrics_and_report_come_from_the_workflow(workdir, run):
    out = workdir / "results" / "validation" / "tiny"
    n = json.loads((workdir / "results" / "tiny" / "shards" / "manifest.json").read_text())["n_samples"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == n and set(metrics["folds"]) <= {0, 1}
    assert metrics["definitions"]["icc"].startswith("ICC(2,1)")
    assert [e["quality"] for e in metrics["jpeg"]] == [50, 5, None]  # None: each radiograph at 1/50 (the default)
    # the tiny radiographs are too small to compress 50x even at quality 1: the JPEG target says so, unjudged
    at_50 = metrics["jpeg"][2]
    assert at_50["target_ratio"] == 50 and at_50["qualities"] == [1, 1] and at_50["min_ratio_raw8"] < 50
    assert at_50["n_short_of_ratio"] == at_50["n"] == n
    jpeg_target = metrics["targets"]["jpeg_1_50"]
    assert jpeg_target["met"] is None and f"{n} of {n} radiographs do not compress 50x" in jpeg_target["target"]
    assert metrics["pose"]["radiographs_per_hip"] == 4  # each hip: its case's radiograph and 3 extra views
    assert (out / "predictions.csv").read_text().count("\n") == n + 1
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    # the upstream stages' quality, from the cohort's QC tables: in metrics.json and in the report
    qc = workdir / "results" / "tiny" / "qc"
    registered = [line.split("\t") for line in (qc / "registration.tsv").read_text().splitlines()]
    header = registered[0]
    pipeline = metrics["pipeline"]
    assert [(r["case_id"], r["mtre_mm"]) for r in pipeline["registration"]] == [
        (row[0], float(row[header.index("mtre_mm")])) for row in registered[1:]]
    assert set(pipeline["segmentation"]) == {"train", "test"}  # demo_000 trains the segmenter, demo_001 is held out
    assert pipeline["segmentation"]["test"]["femur_left"]["n"] == 1
    assert [f["case_id"] for f in pipeline["failures"]] == [
        line.split("\t")[0] for line in (qc / "failures.tsv").read_text().splitlines()[1:]]
    assert "Registration of each case" in page and all(row[0] in page for row in registered[1:])
    assert "Segmentation (nnU-Net) against the reference labels" in page


def test_no_identifying_value_reaches_results_or_logs(workdir, run):
    identities = set(PHI.values())
    for dx in (workdir / "results" / "tiny" / "demo_input").rglob("xray.dcm"):
        ds = pydicom.dcmread(dx)
        identities |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.StudyInstanceUID)}
    checked = 0
    for p in list((workdir / "results").rglob("*")) + list((workdir / ".snakemake" / "log").rglob("*")):
        if not p.is_file() or "demo_input" in p.parts:  # demo_input holds the "hospital's" own files
            continue
        data = p.read_bytes()
        data = gzip.decompress(data) if p.suffix == ".gz" else data
        for value in identities:
            assert value.encode() not in data, (p, value)
        checked += 1
    assert checked >= 12


def test_every_costly_job_records_its_time_and_memory(workdir, run, tmp_path):
    """Snakemake's benchmark files, one per job, summed per rule by benchmarks/job_times.py."""
    bench = workdir / "results" / "tiny" / "benchmarks"
    assert sorted(p.stem for p in (bench / "register").glob("*.tsv")) == ["demo_000", "demo_001"]
    assert sorted(p.stem for p in (bench / "train").glob("*.tsv")) == ["all", "fold0", "fold1"]
    out = tmp_path / "job_times.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "job_times.py"), str(bench), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rules = json.loads(out.read_text())["rules"]
    assert {"demo_patient", "ingest", "train_segmenter", "segment", "calibrate", "register", "drr", "bmd",
            "pack_shards", "train", "validate"} <= set(rules)
    assert rules["register"]["jobs"] == 2 and rules["train"]["jobs"] == 3
    # Training a model takes seconds even in this tiny run, and a torch process holds far more than 50 MiB.
    assert rules["train"]["median_s"] > 1 and rules["train"]["max_rss_mib"] > 50
    assert "register" in result.stdout and "peak MiB" in result.stdout


def test_rerun_has_nothing_to_do(workdir, run):
    result = snakemake(workdir, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Nothing to be done" in out, out


def test_a_changed_setting_reruns_its_stage_and_what_follows(workdir, run, tmp_path):
    """Editing a cohort's segmentation settings retrains its segmenter (Snakemake's params trigger), and
    the new model's labels replace the old ones (Snakemake itself would not rerun the jobs after the
    segment checkpoint while their outputs exist). On a copy of the finished run."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["cohorts"]["tiny"]["segmentation"]["epochs"] += 1
    (copy / "changed.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(copy),
           "--configfile", str(copy / "changed.yaml"), "--cores", "2"]
    dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=300)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out
    assert any(line.split()[:2] == ["train_segmenter", "1"] for line in out.splitlines()), out
    assert "Params have changed since last execution" in out, out
    targets = [f"results/tiny/{case}/labels.nii.gz" for case in ("demo_000", "demo_001")]
    labels = [copy / target for target in targets]
    result = subprocess.run([*cmd, *targets], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retrained = (copy / "results" / "tiny" / "segmenter" / "model" / "training.json")
    assert json.loads(retrained.read_text())["nnunet"]["epochs"] == config["cohorts"]["tiny"]["segmentation"]["epochs"]
    assert all(path.stat().st_mtime > retrained.stat().st_mtime for path in labels)


def test_bad_samplesheet_stops_before_any_job(tmp_path):
    (tmp_path / "bad.tsv").write_text(f"case_id\tct\txray\n../x\t{REAL_CT}\t{REAL_CT}\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"cohorts": {"hosp": {
        "samples": "bad.tsv", "calibration": {"method": "internal"}}}}))
    result = snakemake(tmp_path)
    assert result.returncode != 0
    assert ("config error: cohort 'hosp', sample sheet bad.tsv line 2 (case '../x'), field 'case_id': "
            "'../x' is not a valid case id (letters, digits, _ and - only)") in result.stderr
    assert not (tmp_path / "results").exists()


# --- Kill and resume --------------------------------------------------------------------------
# SIGKILL the whole workflow while a heavy stage's jobs run, rerun the same command, and compare
# with the uninterrupted run above: same results, nothing half-written left behind.

# how Snakemake announces a starting job ("localcheckpoint" for a checkpoint run on this machine)
JOB_KINDS = ("rule", "localrule", "checkpoint", "localcheckpoint")
# rule -> its outputs (under results/): the kill must come before all of them exist
KILLED_STAGES = {
    "train_segmenter": ["tiny/segmenter/model"],
    "segment_check": [f"tiny/{c}/status/segment.json" for c in ("demo_000", "demo_001")],
    "register": [f"tiny/{c}/pose.json" for c in ("demo_000", "demo_001")],
    "drr": [f"tiny/{c}/drr.h5" for c in ("demo_000", "demo_001")],
    "pack_shards": ["tiny/shards/manifest.json"],
    "train": [f"models/tiny_{split}/model.pt" for split in ("all", "fold0", "fold1")],
}
# What legitimately differs between two runs: wall-clock times (train_log.tsv, the report, Snakemake's
# benchmark files), pictures,
# and the nnU-Net model folder's own logs and checkpoints (they carry times); its training.json, and the
# Dice of the model's predictions, are compared (the training is seeded).
NOT_COMPARED = ("train_log.tsv", "report.html", "benchmarks")


def not_compared(rel: Path) -> bool:
    return (any(n in rel.parts or n == rel.name for n in NOT_COMPARED)
            or ("segmenter" in rel.parts and rel.name != "training.json"))


def temporary_files(results: Path) -> set[Path]:
    return {p for p in results.rglob("*") if ".tmp-" in p.name}


def snakemake_killed_at(workdir: Path, rule: str, after_s: float = 0.7) -> list[str]:
    """Run the workflow and SIGKILL it (with its jobs) in the first job of ``rule``: as soon as an output
    is being written (a temporary file appears) or ``after_s`` into the job, whichever comes first (a
    fast job may be done before a fixed delay). Returns the lines Snakemake printed."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        words = line.split()
        if len(words) == 2 and words[1] == f"{rule}:" and words[0] in JOB_KINDS:
            deadline = time.monotonic() + after_s
            before = temporary_files(workdir / "results")  # an earlier kill's, until their jobs rerun
            while time.monotonic() < deadline and not temporary_files(workdir / "results") - before:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return lines


def comparable(path: Path):
    """A result file's content, without what legitimately differs between runs (gzip timestamps,
    HDF5 object times, PNG rendering)."""
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".json":
        return _without_times(json.loads(path.read_text()))
    if path.suffix == ".tsv":  # without its time columns (inference_s, ...)
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if not (name.endswith("_s") or _is_time(name))] if rows else []
        return [[row[i] for i in keep] for row in rows]
    if path.suffix == ".pt":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        return repr(_without_times(state)) if not isinstance(state, dict) else {
            k: (v.numpy().tobytes() if hasattr(v, "numpy") else repr(_without_times(v))) for k, v in state.items()}
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path) as f:
            out = {}
            f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            # variable-length strings come back as object arrays, whose bytes are pointers
            return {k: (v.tolist() if getattr(getattr(v, "dtype", None), "kind", "") == "O" else
                        v.tobytes() if hasattr(v, "tobytes") else v) for k, v in out.items()}
    return path.read_bytes()


def _is_time(name) -> bool:
    return any(t in str(name).lower() for t in ("second", "time", "elapsed", "duration", "date"))


def _without_times(obj):
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if not _is_time(k)}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, workdir):
    d = tmp_path_factory.mktemp("resumed")
    (d / "config.yaml").write_text((workdir / "config.yaml").read_text())
    (d / "real.tsv").write_text((workdir / "real.tsv").read_text())
    (d / "data").mkdir()
    (d / "data" / "real.dcm").write_bytes((workdir / "data" / "real.dcm").read_bytes())
    interrupted = {}
    for rule, outputs in KILLED_STAGES.items():
        lines = snakemake_killed_at(d, rule)
        started = any(line.split()[-2:] == [line.split()[0], f"{rule}:"] and line.split()[0] in JOB_KINDS
                      for line in lines if len(line.split()) == 2)
        missing = [o for o in outputs if not (d / "results" / o).exists()]
        interrupted[rule] = started and bool(missing)
    final = snakemake(d)
    return d, interrupted, final


def test_killed_runs_resume_to_identical_results(workdir, run, resumed):
    d, interrupted, final = resumed
    assert interrupted == {rule: True for rule in KILLED_STAGES}  # each kill hit its stage mid-way
    assert final.returncode == 0, final.stderr[-3000:]
    def compared(root):
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and "logs" not in p.parts
                      and p.suffix != ".png" and not not_compared(p.relative_to(root)))

    reference, again = compared(workdir / "results"), compared(d / "results")
    assert again == reference
    for rel in reference:
        if rel.parts[1] == "demo_input" and rel.suffix in (".dcm", ".png", ".jpg"):
            continue  # the demo's own DICOM carries the run date
        a, b = comparable(workdir / "results" / rel), comparable(d / "results" / rel)
        if isinstance(a, dict) and isinstance(b, dict):  # name the differing entries, not a byte dump
            assert sorted(a) == sorted(b), rel
            assert [k for k in a if a[k] != b[k]] == [], rel
        assert a == b, rel
    leftovers = [p for p in (d / "results").rglob("*") if ".tmp-" in p.name or p.name == ".staged"]
    assert leftovers == []
