#!/usr/bin/env python
"""Long fuzzing runs of the DICOM readers (the CI test, tests/test_fuzz_dicom.py, runs a few hundred
examples; this runs for as long as it is given).

Each mutant comes from one integer seed (tests/dicom_fuzzing.py), so a crash is reproduced by its
seed. A run appends its record (time budget, mutants tried per reader, how many were read or refused
with InputError, and the seed and traceback of every crash) to benchmarks/results/fuzz_dicom.json;
the seeds of a run start where the previous run ended, so runs add up to one long campaign.

    python scripts/fuzz_dicom.py --minutes 15        # one run
    python scripts/fuzz_dicom.py --replay 1234567    # re-run one seed and show the exception
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from bonedrr.dicom import read_ct_series, read_radiograph  # noqa: E402
from bonedrr.errors import InputError  # noqa: E402
from dicom_fuzzing import mutant, small_ct, small_dx  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fuzz_dicom.json"


def one(kind: str, seed: int, seeds: dict, work: Path) -> str:
    """Fuzz one mutant; returns "read" or "refused", raises on a crash of the reader (a failure of
    the mutator itself is a bug of this harness and stops the run)."""
    if kind.startswith("dx"):
        path = work / "x.dcm"
        path.write_bytes(mutant(seeds[kind], seed))
        target = lambda: read_radiograph(path)  # noqa: E731
    else:
        folder = work / "ct"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(seeds["ct"], folder)
        victim = sorted(folder.iterdir())[seed % 4]
        victim.write_bytes(mutant(victim.read_bytes(), seed))
        target = lambda: read_ct_series(folder)  # noqa: E731
    return run_reader(target)


class ReaderCrash(Exception):
    pass


def run_reader(target) -> str:
    try:
        target()
        return "read"
    except InputError:
        return "refused"
    except Exception as e:
        raise ReaderCrash(f"{type(e).__name__}: {e}") from e


def _where(error: BaseException) -> str:
    """The innermost project frame of a traceback (file:line function)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "bonedrr" in f.filename]
    f = (frames or traceback.extract_tb(error.__traceback__))[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replay", type=int, help="re-run this seed on every reader and show what happens")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    history = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    kinds = ("dx", "dx_mono1", "ct")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = {"dx": small_dx(work / "seed_dx.dcm").read_bytes(),
                 "dx_mono1": small_dx(work / "seed_dx1.dcm", "MONOCHROME1", 16).read_bytes(),
                 "ct": small_ct(work / "seed_ct")}
        if args.replay is not None:
            for kind in kinds:
                try:
                    print(kind, one(kind, args.replay, seeds, work))
                except Exception:
                    traceback.print_exc()
            return 0
        start_seed = max((r["seeds"][1] for r in history["runs"]), default=0)
        seed, counts, crashes = start_seed, {k: {"read": 0, "refused": 0, "crashed": 0} for k in kinds}, []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.minutes * 60:
            for kind in kinds:
                try:
                    counts[kind][one(kind, seed, seeds, work)] += 1
                except ReaderCrash as e:
                    counts[kind]["crashed"] += 1
                    crashes.append({"reader": kind, "seed": seed, "error": str(e)[:300],
                                    "where": _where(e.__cause__)})
            seed += 1
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "minutes": round((time.monotonic() - t0) / 60, 2),
           "seeds": [start_seed, seed], "mutants": sum(sum(c.values()) for c in counts.values()),
           "per_reader": counts, "crashes": crashes}
    history["runs"].append(run)
    history["total_minutes"] = round(sum(r["minutes"] for r in history["runs"]), 2)
    history["total_mutants"] = sum(r["mutants"] for r in history["runs"])
    history["total_crashes"] = sum(len(r["crashes"]) for r in history["runs"])
    RESULTS.write_text(json.dumps(history, indent=1) + "\n")
    print(json.dumps({k: v for k, v in run.items() if k != "crashes"}, indent=1), f"crashes: {len(crashes)}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
