"""Case outcomes: which cases of a cohort reached the training data, and why the others did not.

A case can fail in three ways, and none of them may stop the other cases or reach the shards:

* its input cannot be used (unreadable or truncated DICOM, wrong modality, missing slices, NaN HU,
  labels off the CT grid, ...), or its segmentation is empty or implausible: ``bonedrr --status FILE
  <command>`` records the command's error in a status file and exits 0, so the workflow goes on with
  the other cases and knows this one failed (the ``ingest_check`` and ``segment_check`` checkpoints);
* its registration fails its QA (``pose.json``: ``converged`` false, with the flags);
* any other job of the case fails (then Snakemake's ``--keep-going`` keeps the other cases going).

``outcome.json`` per case says which (``ok``, ``stage``, ``reason``), and ``qc/failures.tsv`` lists the
failed cases of a cohort. Reasons name the file by its name only (folder names can carry a patient's
name), never a DICOM value.

Example:
    >>> from bonedrr.errors import InputError
    >>> status_record("ingest", InputError("modality is MR, not CT", "/data/x/CT0001.dcm"))["reason"]
    'CT0001.dcm: modality is MR, not CT'
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bonedrr.errors import BonedrrError, InputError
from bonedrr.images import write_json

FAILURES_HEADER = "case_id\tstage\treason"


def status_record(command: str, error: BonedrrError | None) -> dict:
    """What ``--status`` writes: ``{"command", "ok"}`` plus ``reason`` when the command failed."""
    if error is None:
        return {"command": command, "ok": True}
    where = f"{Path(error.path).name}: " if error.path else ""
    return {"command": command, "ok": False, "reason": f"{where}{error.message}"}


def write_status(path: str | Path, command: str, error: BonedrrError | None) -> None:
    write_json(path, status_record(command, error))


def read_status(path: str | Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record.get("ok"), bool):
            raise ValueError("no 'ok' field")
        return record
    except (OSError, ValueError) as e:
        raise InputError(f"not a status file ({e})", path) from None


def accept_staged(staged: str | Path, out_dir: str | Path, names: list[str]) -> None:
    """Move a checked stage's files from its staging folder into the case folder (renames within one
    file system: a file is either absent or complete), then remove the staging folder."""
    staged, out_dir = Path(staged), Path(out_dir)
    missing = [n for n in names if not (staged / n).is_file()]
    if missing:
        raise InputError(f"staged files missing: {', '.join(missing)} (rerun the check)", staged)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (staged / name).replace(out_dir / name)
        (out_dir / name).touch()  # newer than the status file: Snakemake sees the outputs as up to date
    shutil.rmtree(staged)


def case_outcome(case_id: str, ingest_status: str | Path, pose: str | Path | None = None,
                 segment_status: str | Path | None = None) -> dict:
    """A case's outcome from its stage records: the first stage that failed, or ok."""
    for stage, path in (("ingest", ingest_status), ("segment", segment_status)):
        if path is not None:
            status = read_status(path)
            if not status["ok"]:
                return {"case_id": case_id, "ok": False, "stage": stage, "reason": status["reason"]}
    if pose is not None:
        record = json.loads(Path(pose).read_text())
        if not record.get("converged", False):
            flags = ", ".join(record.get("qa_flags", [])) or "not converged"
            return {"case_id": case_id, "ok": False, "stage": "register", "reason": f"registration QA: {flags}"}
    return {"case_id": case_id, "ok": True, "stage": None, "reason": ""}


def failures_table(outcomes: list[str | Path], out_tsv: str | Path) -> list[dict]:
    """The failed cases of a cohort, one line each (header only when none failed)."""
    from bonedrr.images import atomic_path

    records = [json.loads(Path(p).read_text()) for p in outcomes]
    failed = [r for r in records if not r["ok"]]
    with atomic_path(out_tsv) as tmp:
        lines = [FAILURES_HEADER] + [f"{r['case_id']}\t{r['stage']}\t{r['reason']}" for r in failed]
        Path(tmp).write_text("\n".join(lines) + "\n")
    return failed
