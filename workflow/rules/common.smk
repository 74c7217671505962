# Configuration loading and input functions shared by the rules. The heavy lifting is in the
# bonedrr package (bonedrr.config): this file only adapts it to Snakemake.

import json
import os
import shlex

from bonedrr.config import cohort_cases, validate_config
from bonedrr.demo.naming import case_files
from bonedrr.errors import ConfigError

try:
    CONFIG = validate_config(config)
    CASES = cohort_cases(CONFIG, base_dir=Path.cwd())
except ConfigError as error:
    raise WorkflowError(str(error)) from None


# A run killed with SIGKILL (or by a node failure) leaves Snakemake's lock behind, and the next run of the
# same command would refuse to start. The lock is stale when the Snakemake process that took it (its
# PID is recorded below, at the start of every run) is gone: then it is released here, before this run
# takes its own. A live run keeps its lock.
RUN_PID = Path(".snakemake") / "bonedrr_run.pid"


def release_stale_lock():
    locks = list((Path(".snakemake") / "locks").glob("*.lock"))
    if not locks or not RUN_PID.exists():
        return
    try:
        os.kill(int(RUN_PID.read_text().split()[0]), 0)  # signal 0: only asks whether the process exists
        alive = True
    except PermissionError:  # it exists, under another user
        alive = True
    except (OSError, ValueError, IndexError):
        alive = False
    if not alive:
        for lock in locks:
            lock.unlink(missing_ok=True)
        RUN_PID.unlink(missing_ok=True)
        print("bonedrr: released the lock of an interrupted run (its Snakemake process is gone)", file=sys.stderr)


release_stale_lock()


onstart:
    RUN_PID.parent.mkdir(exist_ok=True)
    RUN_PID.write_text(f"{os.getpid()}\n")


def bonedrr_command():
    """How a job calls the bonedrr CLI: the package of this checkout (whether or not it is installed in
    the job's environment), run by the conda env's python with --use-conda, else by the python that
    runs Snakemake (so a pip-installed environment works without activating it).

    The paths come through environment variables (set here, in every Snakemake process that runs a
    job, a cluster job's included): the command is a param of every rule, and a param that held the
    checkout's or the venv's absolute path would rerun the whole workflow when either moves."""
    from snakemake.settings.types import DeploymentMethod

    uses_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    os.environ.update(BONEDRR_SRC=str(SRC), BONEDRR_PYTHON="python" if uses_conda else sys.executable)
    return 'PYTHONPATH="$BONEDRR_SRC${PYTHONPATH:+:$PYTHONPATH}" "$BONEDRR_PYTHON" -m bonedrr'


BONEDRR = bonedrr_command()


def is_demo(cohort):
    return "demo" in CONFIG["cohorts"][cohort]


def demo_case_dir(cohort, case):
    return f"results/{cohort}/demo_input/{case}"


def all_outputs():
    """The targets of the default rule: each case's outcome (which pulls in its stages, or records
    why it failed) and each cohort's summaries."""
    outputs = []
    for cohort, cases in CASES.items():
        if is_demo(cohort):
            outputs.append(f"results/{cohort}/demo_input/samples.tsv")
        outputs += [f"results/{cohort}/{case}/outcome.json" for case in cases]
        outputs += [f"results/{cohort}/qc/ingest.png", f"results/{cohort}/qc/failures.tsv"]
        if labelled_cases(cohort):
            outputs.append(f"results/{cohort}/qc/registration.tsv")
            outputs.append(f"results/{cohort}/qc/segmentation.tsv")
            outputs += [f"results/{cohort}/qc/bmd.tsv", f"results/{cohort}/shards/manifest.json"]
    outputs += validation_outputs()
    return outputs


def staging_dir(wildcards):
    return f"results/{wildcards.cohort}/{wildcards.case}/.staged"


def ingest_ok(cohort, case):
    """Whether the case's input passed ingest (waits for its ingest_check checkpoint)."""
    status = checkpoints.ingest_check.get(cohort=cohort, case=case).output.status
    with open(status) as f:
        return json.load(f)["ok"]


def ingested_cases(cohort):
    return [case for case in CASES[cohort] if ingest_ok(cohort, case)]


def segment_ok(cohort, case):
    """Whether the case's segmentation passed its checks (waits for its segment_check checkpoint)."""
    status = checkpoints.segment_check.get(cohort=cohort, case=case).output.status
    with open(status) as f:
        return json.load(f)["ok"]


def checkpoint_statuses(stages):
    """An input function naming, without waiting for any, the checkpoint status files a cohort-wide step
    depends on through :func:`ingested_cases` or :func:`downstream_cases`.

    Those iterate over the cases and meet their checkpoints one at a time: each unfinished one stops the
    evaluation, so a step asked for on its own (``snakemake results/validation/demo/report.html``) would
    get one case's checkpoint per DAG update, one job at a time. Named as a plain input, every checkpoint
    is scheduled at once. ``stages``: ``("ingest",)`` or ``("ingest", "segment")``; segment checks only
    of the cases whose ingest is known to have passed (the others never run one).
    """

    def statuses(wildcards):
        cohort = wildcards.cohort
        files = [f"results/{cohort}/{case}/status/ingest.json" for case in CASES[cohort]]
        if "segment" in stages:
            for case in labelled_cases(cohort):
                ingest = Path(f"results/{cohort}/{case}/status/ingest.json")
                if ingest.is_file() and json.loads(ingest.read_text()).get("ok"):
                    files.append(f"results/{cohort}/{case}/status/segment.json")
        return files

    return statuses


def downstream_cases(cohort):
    """The cases that go on to registration and DRRs: in a cohort that segments (labelled_cases),
    passed ingest and segmentation."""
    return [case for case in labelled_cases(cohort) if ingest_ok(cohort, case) and segment_ok(cohort, case)]


def case_outcome_inputs(wildcards):
    """A case's outcome needs its ingest record and, when ingest passed, its last stages."""
    cohort, case = wildcards.cohort, wildcards.case
    inputs = {"status": checkpoints.ingest_check.get(cohort=cohort, case=case).output.status}
    if ingest_ok(cohort, case):
        inputs["case"] = f"results/{cohort}/{case}/case.json"
        if case in labelled_cases(cohort):
            inputs["segment_status"] = checkpoints.segment_check.get(cohort=cohort, case=case).output.status
            if segment_ok(cohort, case):
                inputs["pose"] = f"results/{cohort}/{case}/pose.json"
                inputs["drr"] = f"results/{cohort}/{case}/drr.h5"
    return inputs


def demo_args(wildcards):
    """Command-line settings of a demo cohort (config keys demo.* and xray.*)."""
    c = CONFIG["cohorts"][wildcards.cohort]
    d, x = c["demo"], c["xray"]
    template = f" --template '{d['template']}'" if d["template"] else ""
    return (
        f"--n {d['n_patients']} --seed {d['seed']} --rows {d['rows']} --cols {d['cols']} "
        f"--pixel-mm {x['pixel_mm'][0]} {x['pixel_mm'][1]} --sdd-mm {x['sdd_mm']} "
        f"--nifti-png-every {d['nifti_png_every']} --abmd-range {d['abmd_range'][0]} {d['abmd_range'][1]} "
        f"--cut-mm {CONFIG['proximal_femur_cut_mm']} --extra-views {d['extra_views']} "
        f"--views-protocol {d['views_protocol']} --sites {d['sites']} --presentation {d['presentation']}"
        f"{template}"
    )


def demo_index(wildcards):
    return CASES[wildcards.cohort][wildcards.case]["index"]


def ingest_inputs(wildcards):
    """A demo case's folder (made by demo_patient), or the sample sheet's files of a real case."""
    if is_demo(wildcards.cohort):
        return {"case_dir": demo_case_dir(wildcards.cohort, wildcards.case)}
    row = CASES[wildcards.cohort][wildcards.case]
    return {k: row[k] for k in ("ct", "xray", "labels") if k in row}


def ingest_args(wildcards):
    """Paths and sample-sheet values for `bonedrr ingest`, quoted for the shell."""
    cohort = CONFIG["cohorts"][wildcards.cohort]
    x = cohort["xray"]
    args = [f"--pixel-mm {x['pixel_mm'][0]} {x['pixel_mm'][1]}", f"--sdd-mm {x['sdd_mm']}"]
    if is_demo(wildcards.cohort):
        files = case_files(demo_index(wildcards), cohort["demo"]["nifti_png_every"], cohort["demo"]["presentation"])
        folder = demo_case_dir(wildcards.cohort, wildcards.case)
        files = {k: f"{folder}/{v}" for k, v in files.items()}
        args.append(f"--clinical-from '{folder}/truth.json'")
        row = {}
    else:
        row = CASES[wildcards.cohort][wildcards.case]
        files = {k: row[k] for k in ("ct", "xray", "labels") if k in row}
    args += [f"--{k} '{v}'" for k, v in files.items()]
    for key in ("side", "patient_id", "dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "scanner",
                "xray_kvp"):
        if key in row:
            args.append(f"--{key.replace('_', '-')} '{row[key]}'")
    return " ".join(args)


def has_reference_labels(cohort, case):
    return is_demo(cohort) or "labels" in CASES[cohort][case]


def calibrate_args(wildcards):
    """`bonedrr calibrate` options from the cohort's calibration settings and the case's scanner."""
    c = CONFIG["cohorts"][wildcards.cohort]["calibration"]
    args = [f"--method {c['method']}", f"--cut-mm {CONFIG['proximal_femur_cut_mm']}"]
    if "phantom_rods_mg_cm3" in c:
        rods = " ".join(str(v) for v in c["phantom_rods_mg_cm3"])
        args.append(f"--rods {rods}")
    for key, flag in (("phantom_background_mg_cm3", "--resin"), ("phantom_min_r2", "--min-r2"),
                      ("internal_fat_hu", "--fat-hu"), ("internal_muscle_hu", "--muscle-hu"),
                      ("reference_ha_hu_per_mg_cm3", "--reference-ha")):
        if key in c:
            args.append(f"{flag} {c[key]}")
    if "scanners" in c:
        args.append(f"--scanners {shlex.quote(json.dumps(c['scanners']))}")
    return " ".join(args)


def labelled_cases(cohort):
    """The cases that get labels.nii.gz (from the segment rule) and so go downstream: every case of a
    cohort with a `segmentation` block (demo cohorts always have one), none of a cohort without."""
    return list(CASES[cohort]) if "segmentation" in CONFIG["cohorts"][cohort] else []


def register_args(wildcards):
    r, x = CONFIG["register"], CONFIG["cohorts"][wildcards.cohort]["xray"]
    args = [f"--min-gc {r['min_gc']}", f"--seed {r['seed']}", f"--device {CONFIG['device']}",
            f"--fine-method {r['fine_method']}", f"--max-restart-spread-mm {r['max_restart_spread_mm']}"]
    if r.get("per_structure"):
        args.append("--per-structure")
    if x.get("sod_mm"):
        args.append(f"--sod-mm {x['sod_mm']}")
    if x.get("sdd_tolerance") is not None:
        args.append(f"--sdd-tolerance {x['sdd_tolerance']}")
    return " ".join(args)


def drr_args(wildcards):
    d = CONFIG["drr"]
    args = [f"--method {d['method']}", f"--device {CONFIG['device']}", f"--cut-mm {CONFIG['proximal_femur_cut_mm']}"]
    if d.get("step_mm"):
        args.append(f"--step-mm {d['step_mm']}")
    if d.get("channels"):
        args.append(f"--channels {shlex.quote(json.dumps(d['channels']))}")
    return " ".join(args)


# Resources of the heavy per-case jobs. Memory grows with the job's input (a CT's voxels) and with
# each retry (`attempt`, profiles/slurm retries), so a job killed for memory comes back with more.
def mem_mb(base_mb, per_input_mb=0):
    return lambda wildcards, input, attempt: int((base_mb + per_input_mb * input.size_mb) * attempt)


def gpus():
    """GPUs a GPU-capable job asks the scheduler for: one with `device: cuda`, none otherwise (with
    `auto` a job uses a GPU only where the scheduler happens to give it one)."""
    return 1 if CONFIG["device"] == "cuda" else 0

def segmentation_config(cohort):
    return CONFIG["cohorts"][cohort]["segmentation"]


def segmenter_training_cases(cohort):
    """Cases whose reference labels train the cohort's model (`segmentation.training_cases`)."""
    wanted = segmentation_config(cohort).get("training_cases")
    labelled = [case for case in CASES[cohort] if has_reference_labels(cohort, case)]
    if wanted is None:
        chosen = labelled
    elif isinstance(wanted, int):
        chosen = labelled[:wanted]
    else:
        missing = [case for case in wanted if case not in labelled]
        if missing:
            raise WorkflowError(f"config error: cohort {cohort!r}: field 'segmentation.training_cases': "
                                f"{', '.join(missing)} are not cases with reference labels")
        chosen = list(wanted)
    if not chosen:
        raise WorkflowError(f"config error: cohort {cohort!r}: field 'segmentation.model': 'train' needs cases "
                            "with reference labels (the sample sheet's labels column)")
    return chosen


def reference_labels_file(cohort, case):
    """A case's reference labels (demo: its true labels; real: the sample sheet's), or None."""
    if is_demo(cohort):
        return f"{demo_case_dir(cohort, case)}/labels.nii.gz"
    return CASES[cohort][case].get("labels")


def segmentation_model(cohort):
    """The cohort's nnU-Net model folder: trained by the workflow, or the one named in config."""
    model = segmentation_config(cohort)["model"]
    return f"results/{cohort}/segmenter/model" if model == "train" else model


def reference_labels_dependency(cohort, case):
    """What a job reading a case's reference labels depends on: a demo case's folder (a directory
    output of demo_patient), or the sample sheet's labels file."""
    return demo_case_dir(cohort, case) if is_demo(cohort) else reference_labels_file(cohort, case)


def segmenter_trained_on(cohort):
    """The training cases whose input passed ingest (a case that failed is left out, and recorded)."""
    return [case for case in segmenter_training_cases(cohort) if ingest_ok(cohort, case)]


def train_segmenter_inputs(wildcards):
    cohort = wildcards.cohort
    statuses = [checkpoints.ingest_check.get(cohort=cohort, case=case).output.status
                for case in segmenter_training_cases(cohort)]
    cases = segmenter_trained_on(cohort)
    if not cases:
        raise WorkflowError(f"cohort {cohort!r}: every training case of the segmenter failed ingest "
                            f"(see results/{cohort}/qc/failures.tsv)")
    return {"status": statuses, "ct": [f"results/{cohort}/{case}/ct.nii.gz" for case in cases],
            "references": [reference_labels_dependency(cohort, case) for case in cases]}


def train_segmenter_labels(wildcards):
    return " ".join(shlex.quote(reference_labels_file(wildcards.cohort, case))
                    for case in segmenter_trained_on(wildcards.cohort))


def train_segmenter_args(wildcards):
    """`bonedrr train-segmenter` options from the cohort's `segmentation` block. (A params function must
    not take `threads`: Snakemake leaves those out of the params it compares to decide on a rerun, and
    a changed setting would not retrain the model; the shell command adds the threads.)"""
    s = segmentation_config(wildcards.cohort)
    args = [f"--case-ids {' '.join(segmenter_trained_on(wildcards.cohort))}", f"--trainer {s['trainer']}",
            f"--fold {s['fold']}", f"--configuration {s['configuration']}", f"--sides {s['sides']}",
            f"--device {s['device']}", *([f"--seed {s['seed']}"] if s["seed"] is not None else [])]
    for key in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
        if s.get(key) is not None:
            args.append(f"--{key.replace('_', '-')} {s[key]}")
    for key, value in (s.get("plans") or {}).items():
        if value is not None:
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            args.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(args)


def segment_inputs(wildcards):
    inputs = {"ct": f"results/{wildcards.cohort}/{wildcards.case}/ct.nii.gz",
              "case": f"results/{wildcards.cohort}/{wildcards.case}/case.json",
              "model": segmentation_model(wildcards.cohort)}
    if reference_labels_file(wildcards.cohort, wildcards.case):
        inputs["reference"] = reference_labels_dependency(wildcards.cohort, wildcards.case)
    return inputs


def segment_args(wildcards):
    """`bonedrr segment` options: preset, fold, device, reference labels, split, checks."""
    s = segmentation_config(wildcards.cohort)
    preset = s["preset"] if isinstance(s["preset"], str) else json.dumps(s["preset"])
    args = [f"--preset {shlex.quote(preset)}", f"--fold {s['fold']}", f"--device {s['device']}",
            f"--labels-downstream {s['labels_downstream']}"]
    reference = reference_labels_file(wildcards.cohort, wildcards.case)
    if reference:
        args.append(f"--reference {shlex.quote(reference)}")
    if s["model"] == "train":
        training = wildcards.case in segmenter_training_cases(wildcards.cohort)
        args.append(f"--split {'train' if training else 'test'}")
    elif reference:
        args.append("--split test")
    if s.get("plausible_volume_cm3"):
        args.append(f"--plausible-volume-cm3 {shlex.quote(json.dumps(s['plausible_volume_cm3']))}")
    return " ".join(args)

def packable_cases(cohort):
    """The cases of a cohort that reach the DRRs, and so the BMD targets and the shards (one place to
    change when segmentation labels every case)."""
    return downstream_cases(cohort)


def bmd_args(wildcards):
    return f"--threshold {CONFIG['bmd']['threshold_g_cm2']} --cut-mm {CONFIG['proximal_femur_cut_mm']}"


def pack_inputs(wildcards):
    """Every file `bonedrr pack` reads of each packable case of the cohort."""
    files = {}
    for case in packable_cases(wildcards.cohort):
        for name in ("case.json", "xray.nii.gz", "pose.json", "drr.h5", "bmd.json"):
            files[f"{case}_{name.split('.')[0]}"] = f"results/{wildcards.cohort}/{case}/{name}"
    return files


def pack_args(wildcards):
    s = CONFIG["shards"]
    return (f"--crop-mm {s['crop_mm'][0]} {s['crop_mm'][1]} --crop-px {s['crop_px'][0]} {s['crop_px'][1]} "
            f"--head-position {s['head_position'][0]} {s['head_position'][1]} --folds {s['folds']} "
            f"--seed {s['seed']} --shard-size-mb {s['shard_size_mb']} --compression {s['compression']} "
            f"--threshold {CONFIG['bmd']['threshold_g_cm2']}")


def train_threads():
    return int(CONFIG["train"].get("threads", 2))


def train_args(wildcards):
    """`bonedrr train` options: the config's train: block as JSON, the device, the held-out fold."""
    settings = {k: v for k, v in CONFIG["train"].items() if k != "threads"}
    args = [f"--settings {shlex.quote(json.dumps(settings))}", f"--device {CONFIG['device']}"]
    if wildcards.split.startswith("fold"):
        args.append(f"--hold-out {int(wildcards.split[4:])}")
    return " ".join(args)


def model_outputs():
    """The model trained on every fold of each cohort with shards (what `bonedrr estimate` uses)."""
    return [f"results/models/{cohort}_all/model.pt" for cohort in CASES if labelled_cases(cohort)]


def validation_folds(cohort):
    """The held-out folds the validation of a cohort uses (config validate.folds; null: every fold)."""
    return CONFIG["validate"]["folds"] or list(range(CONFIG["shards"]["folds"]))


def validate_inputs(wildcards):
    """Shards, one model per validated fold, the whole radiographs and BMD records of the cohort's cases
    (the JPEG sweep re-crops them), and a demo cohort's patient folders (the multi-pose sweep)."""
    cohort = wildcards.cohort
    cases = packable_cases(cohort)
    files = {"manifest": f"results/{cohort}/shards/manifest.json",
             "models": [f"results/models/{cohort}_fold{k}/model.pt" for k in validation_folds(cohort)],
             "xrays": [f"results/{cohort}/{case}/xray.nii.gz" for case in cases],
             "bmd": [f"results/{cohort}/{case}/bmd.json" for case in cases],
             "qc": [f"results/{cohort}/qc/{name}" for name in ("segmentation.tsv", "registration.tsv", "failures.tsv")]}
    if is_demo(cohort):
        files["demo"] = [demo_case_dir(cohort, case) for case in cases]
    return files


def validate_args(wildcards):
    v, cohort = CONFIG["validate"], CONFIG["cohorts"][wildcards.cohort]
    x = cohort["xray"]
    args = [f"--jpeg-qualities {' '.join(str(q) for q in v['jpeg_qualities'])}",
            f"--jpeg-ratios {' '.join(str(r) for r in v['jpeg_ratios'])}", f"--examples {v['examples']}",
            f"--threshold {CONFIG['bmd']['threshold_g_cm2']}", f"--device {CONFIG['device']}",
            f"--pixel-mm {x['pixel_mm'][0]} {x['pixel_mm'][1]}"]
    if is_demo(wildcards.cohort) and cohort["demo"]["extra_views"] > 0:
        args.append(f"--demo-root results/{wildcards.cohort}/demo_input")
    return " ".join(args)


def validation_outputs():
    """The validation report of each cohort with shards."""
    return [f"results/validation/{cohort}/report.html" for cohort in CASES if labelled_cases(cohort)]
