# bonedrr: paired hip CTs and radiographs -> X-ray decomposition training data -> BMD from one radiograph.
#
#   snakemake --cores all            # the demo cohort (config/config.yaml), pip-installed environment
#   snakemake --cores all --use-conda
#   snakemake -n                     # the DAG, without running it
#
# The configuration and every cohort's sample sheet are validated here, before any job starts.

import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The rules call the bonedrr package; make it importable without installation (conda envs).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)


configfile: "config/config.yaml"


wildcard_constraints:
    cohort="[A-Za-z0-9_-]+",
    case="[A-Za-z0-9_-]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/drr.smk"
include: "workflow/rules/outcome.smk"
include: "workflow/rules/bmd.smk"
include: "workflow/rules/pack.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/validate.smk"


rule all:
    input:
        all_outputs(),
        model_outputs(),
    default_target: True
