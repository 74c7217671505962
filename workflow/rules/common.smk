# Configuration loading and input functions shared by the rules. The heavy lifting is in the
# bonedrr package (bonedrr.config): this file only adapts it to Snakemake.

import json
import shlex

from bonedrr.config import cohort_cases, validate_config
from bonedrr.demo.naming import case_files
from bonedrr.errors import ConfigError

try:
    CONFIG = validate_config(config)
    CASES = cohort_cases(CONFIG, base_dir=Path.cwd())
except ConfigError as error:
    raise WorkflowError(str(error)) from None


def bonedrr_command():
    """How a job calls the bonedrr CLI: the package of this checkout (whether or not it is installed in
    the job's environment), run by the conda env's python with --use-conda, else by the python that
    runs Snakemake (so a pip-installed environment works without activating it)."""
    from snakemake.settings.types import DeploymentMethod

    uses_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    python = "python" if uses_conda else f"'{sys.executable}'"
    return f"PYTHONPATH='{SRC}'${{PYTHONPATH:+:$PYTHONPATH}} {python} -m bonedrr"


BONEDRR = bonedrr_command()


def is_demo(cohort):
    return "demo" in CONFIG["cohorts"][cohort]


def demo_case_dir(cohort, case):
    return f"results/{cohort}/demo_input/{case}"


def all_outputs():
    """The targets of the default rule: each stage's final per-case and per-cohort files."""
    outputs = []
    for cohort, cases in CASES.items():
        if is_demo(cohort):
            outputs.append(f"results/{cohort}/demo_input/samples.tsv")
        outputs += [f"results/{cohort}/{case}/case.json" for case in cases]
        outputs.append(f"results/{cohort}/qc/ingest.png")
        labelled = labelled_cases(cohort)
        outputs += [f"results/{cohort}/{case}/drr.h5" for case in labelled]
        if labelled:
            outputs.append(f"results/{cohort}/qc/registration.tsv")
        if packable_cases(cohort):
            outputs += [f"results/{cohort}/qc/bmd.tsv", f"results/{cohort}/shards/manifest.json"]
    outputs += validation_outputs()
    return outputs


def demo_args(wildcards):
    """Command-line settings of a demo cohort (config keys demo.* and xray.*)."""
    c = CONFIG["cohorts"][wildcards.cohort]
    d, x = c["demo"], c["xray"]
    template = f" --template '{d['template']}'" if d["template"] else ""
    return (
        f"--n {d['n_patients']} --seed {d['seed']} --rows {d['rows']} --cols {d['cols']} "
        f"--pixel-mm {x['pixel_mm'][0]} {x['pixel_mm'][1]} --sdd-mm {x['sdd_mm']} "
        f"--nifti-png-every {d['nifti_png_every']} --abmd-range {d['abmd_range'][0]} {d['abmd_range'][1]} "
        f"--cut-mm {CONFIG['proximal_femur_cut_mm']} --extra-views {d['extra_views']}"
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
        files = case_files(demo_index(wildcards), cohort["demo"]["nifti_png_every"])
        folder = demo_case_dir(wildcards.cohort, wildcards.case)
        files = {k: f"{folder}/{v}" for k, v in files.items()}
        args.append(f"--clinical-from '{folder}/truth.json'")
        row = {}
    else:
        row = CASES[wildcards.cohort][wildcards.case]
        files = {k: row[k] for k in ("ct", "xray", "labels") if k in row}
    args += [f"--{k} '{v}'" for k, v in files.items()]
    for key in ("side", "patient_id", "dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "scanner"):
        if key in row:
            args.append(f"--{key.replace('_', '-')} '{row[key]}'")
    return " ".join(args)


def has_reference_labels(cohort, case):
    return is_demo(cohort) or "labels" in CASES[cohort][case]


def reference_labels_path(wildcards):
    if is_demo(wildcards.cohort):
        return f"{demo_case_dir(wildcards.cohort, wildcards.case)}/labels.nii.gz"
    return shlex.quote(CASES[wildcards.cohort][wildcards.case]["labels"])


def reference_labels_inputs(wildcards):
    if is_demo(wildcards.cohort):
        return {"case_dir": demo_case_dir(wildcards.cohort, wildcards.case)}
    return {"labels": CASES[wildcards.cohort][wildcards.case]["labels"]}


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
    return [case for case in CASES[cohort] if has_reference_labels(cohort, case)]


def register_args(wildcards):
    r, x = CONFIG["register"], CONFIG["cohorts"][wildcards.cohort]["xray"]
    args = [f"--min-gc {r['min_gc']}", f"--seed {r['seed']}", f"--device {CONFIG['device']}"]
    if x.get("sod_mm"):
        args.append(f"--sod-mm {x['sod_mm']}")
    return " ".join(args)


def drr_args(wildcards):
    d = CONFIG["drr"]
    args = [f"--method {d['method']}", f"--device {CONFIG['device']}", f"--cut-mm {CONFIG['proximal_femur_cut_mm']}"]
    if d.get("step_mm"):
        args.append(f"--step-mm {d['step_mm']}")
    if d.get("channels"):
        args.append(f"--channels {shlex.quote(json.dumps(d['channels']))}")
    return " ".join(args)


def packable_cases(cohort):
    """The cases of a cohort that reach the DRRs, and so the BMD targets and the shards (one place to
    change when segmentation labels every case)."""
    return labelled_cases(cohort)


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
    return [f"results/models/{cohort}_all/model.pt" for cohort in CASES if packable_cases(cohort)]


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
             "bmd": [f"results/{cohort}/{case}/bmd.json" for case in cases]}
    if is_demo(cohort):
        files["demo"] = [demo_case_dir(cohort, case) for case in cases]
    return files


def validate_args(wildcards):
    v, cohort = CONFIG["validate"], CONFIG["cohorts"][wildcards.cohort]
    x = cohort["xray"]
    args = [f"--jpeg-qualities {' '.join(str(q) for q in v['jpeg_qualities'])}", f"--examples {v['examples']}",
            f"--threshold {CONFIG['bmd']['threshold_g_cm2']}", f"--device {CONFIG['device']}",
            f"--pixel-mm {x['pixel_mm'][0]} {x['pixel_mm'][1]}"]
    if is_demo(wildcards.cohort) and cohort["demo"]["extra_views"] > 0:
        args.append(f"--demo-root results/{wildcards.cohort}/demo_input")
    return " ".join(args)


def validation_outputs():
    """The validation report of each cohort with shards."""
    return [f"results/validation/{cohort}/report.html" for cohort in CASES if packable_cases(cohort)]
