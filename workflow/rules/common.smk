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
            outputs.append(f"results/{cohort}/qc/segmentation.tsv")
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
        f"--cut-mm {CONFIG['proximal_femur_cut_mm']}"
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


def train_segmenter_inputs(wildcards):
    cases = segmenter_training_cases(wildcards.cohort)
    return {"ct": [f"results/{wildcards.cohort}/{case}/ct.nii.gz" for case in cases],
            "references": [reference_labels_dependency(wildcards.cohort, case) for case in cases]}


def train_segmenter_labels(wildcards):
    return " ".join(shlex.quote(reference_labels_file(wildcards.cohort, case))
                    for case in segmenter_training_cases(wildcards.cohort))


def train_segmenter_args(wildcards, threads):
    """`bonedrr train-segmenter` options from the cohort's `segmentation` block."""
    s = segmentation_config(wildcards.cohort)
    args = [f"--case-ids {' '.join(segmenter_training_cases(wildcards.cohort))}", f"--trainer {s['trainer']}",
            f"--fold {s['fold']}", f"--configuration {s['configuration']}", f"--sides {s['sides']}",
            f"--device {s['device']}",
            f"--processes {max(1, threads - 1)}", f"--threads {threads}"]
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
