"""Case outcomes: a failing case is recorded and left out, never half-written; write errors are clear."""

import errno
import json
import os

import numpy as np
import pytest

from bonedrr.cli import main
from bonedrr.errors import BonedrrError, InputError
from bonedrr.images import atomic_path, write_json
from bonedrr.outcome import accept_staged, case_outcome, failures_table

from conftest import REAL_CT


def test_status_records_an_input_error_and_exits_0(tmp_path, capsys):
    status = tmp_path / "status" / "ingest.json"
    code = main(["--status", str(status), "ingest", "--case-id", "a", "--ct", str(REAL_CT), "--xray",
                 str(REAL_CT), "--out", str(tmp_path / "staged"), "--sdd-mm", "1000"])
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bonedrr ingest: error: ") and str(REAL_CT) in err
    record = json.loads(status.read_text())
    assert record["command"] == "ingest" and record["ok"] is False
    assert record["reason"].startswith("ct.nii.gz: ") and "/" not in record["reason"].split(":")[0]
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").iterdir())


def test_without_status_the_same_error_exits_2(tmp_path):
    assert main(["ingest", "--case-id", "a", "--ct", str(REAL_CT), "--xray", str(REAL_CT),
                 "--out", str(tmp_path / "o"), "--sdd-mm", "1000"]) == 2


def test_accept_staged_moves_complete_files_only(tmp_path):
    staged, out = tmp_path / ".staged", tmp_path / "case"
    staged.mkdir()
    (staged / "a.txt").write_text("a")
    with pytest.raises(InputError, match=r"\.staged: staged files missing: b\.txt \(rerun the check\)"):
        accept_staged(staged, out, ["a.txt", "b.txt"])
    assert not out.exists()  # nothing moved when anything is missing
    (staged / "b.txt").write_text("b")
    accept_staged(staged, out, ["a.txt", "b.txt"])
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"] and not staged.exists()


def test_outcomes_and_failures_table(tmp_path):
    write_json(tmp_path / "ok.json", {"command": "ingest", "ok": True})
    write_json(tmp_path / "bad.json", {"command": "ingest", "ok": False, "reason": "x.dcm: no pixel data"})
    write_json(tmp_path / "pose.json", {"converged": False, "qa_flags": ["low_similarity"]})
    write_json(tmp_path / "seg.json", {"command": "segment", "ok": False,
                                       "reason": "ct.nii.gz: segmentation has no femur_left (the case is measured on side 'left')"})
    records = {"a": case_outcome("a", tmp_path / "ok.json"),
               "b": case_outcome("b", tmp_path / "bad.json"),
               "c": case_outcome("c", tmp_path / "ok.json", tmp_path / "pose.json"),
               "d": case_outcome("d", tmp_path / "ok.json", None, tmp_path / "seg.json")}
    assert records["a"]["ok"] and not records["b"]["ok"] and records["c"]["stage"] == "register"
    assert records["d"]["stage"] == "segment" and "no femur_left" in records["d"]["reason"]
    paths = []
    for case, record in records.items():
        write_json(tmp_path / f"{case}.outcome.json", record)
        paths.append(tmp_path / f"{case}.outcome.json")
    failures_table(paths, tmp_path / "failures.tsv")
    assert (tmp_path / "failures.tsv").read_text() == (
        "case_id\tstage\treason\nb\tingest\tx.dcm: no pixel data\nc\tregister\tregistration QA: low_similarity\n"
        "d\tsegment\tct.nii.gz: segmentation has no femur_left (the case is measured on side 'left')\n")


def test_a_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "drr.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_rewrite_removes_what_a_killed_writer_left(tmp_path):
    """SIGKILL skips every clean-up: the rerun that writes the same output removes the leftover, and only
    that output's."""
    (tmp_path / ".drr.h5.tmp-k1ll3d.h5").write_bytes(b"half")
    (tmp_path / ".pose.json.tmp-0ther.json").write_bytes(b"{")
    with atomic_path(tmp_path / "drr.h5") as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pose.json.tmp-0ther.json", "drr.h5"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_permission_error_is_one_clear_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(BonedrrError, match=r"ro/x\.json: cannot write: Permission denied"):
            write_json(folder / "x.json", {"a": 1})
    finally:
        folder.chmod(0o700)


def test_disk_full_is_one_clear_line(tmp_path):
    """A full disk (ENOSPC) during the final rename of a write: a clear error, no file, no leftover."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    target = tmp_path / "density.npy"
    with pytest.raises(BonedrrError, match=r"density\.npy: cannot write: No space left on device"):
        with atomic_path(target):
            with open("/dev/full", "wb") as full:  # writing here raises ENOSPC like a full disk
                try:
                    full.write(np.zeros(1 << 16).tobytes())
                    full.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    raise
    assert list(tmp_path.iterdir()) == []
