"""The workflow on a real SLURM cluster: a one-node cluster on this machine
(``scripts/slurm/local_cluster.sh``), jobs submitted by snakemake-executor-plugin-slurm through
``profiles/slurm``.

Runs where SLURM is installed and the tests run as root (to start the daemons); elsewhere it is
skipped with the command that installs it: ``scripts/slurm/local_cluster.sh install``.
"""

import os
import shutil
import subprocess
import sys

import h5py
import pytest
import yaml

from conftest import REPO, tiny_workflow_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip(f"SLURM is not installed (as root: {CLUSTER.relative_to(REPO)} install)")
    if os.geteuid() != 0:
        pytest.skip("starting the one-node SLURM cluster needs root")
    pytest.importorskip("snakemake_executor_plugin_slurm")
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    return started.stdout


def test_tiny_demo_runs_through_slurm(cluster, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_workflow_config()))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "profiles" / "slurm"),
           # the one-node cluster has no account database: no account, job state from squeue
           "--slurm-no-account", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    submitted = [line for line in log.splitlines() if "has been submitted with SLURM jobid" in line]
    # every job but the local target rule went through sbatch
    assert len(submitted) >= 12, log[-4000:]
    for case in ("demo_000", "demo_001"):
        with h5py.File(tmp_path / "results" / "tiny" / case / "drr.h5") as f:
            assert f["drr"].shape[1:] == (48, 80) and f["drr"][:].max() > 0.1
    assert (tmp_path / "results" / "tiny" / "qc" / "registration.tsv").read_text().count("\n") == 3
    assert (tmp_path / "results" / "validation" / "tiny" / "report.html").is_file()  # the whole DAG ran
