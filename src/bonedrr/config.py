"""Workflow configuration: loaded, validated against its JSON Schema, sample sheets checked row by row.

Used by the Snakefile at start-up (before any job runs) and by the CLI. Kept free of heavy imports:
Snakemake's own environment only needs PyYAML and jsonschema to load it.

Every problem is a :class:`~bonedrr.errors.ConfigError` whose one-line message names the cohort, the
row (sample-sheet line) and the field.

Example:
    >>> cfg = {"cohorts": {"a": {"samples": "a.tsv", "colour": "red"}}}
    >>> try:
    ...     validate_config(cfg)
    ... except ConfigError as e:
    ...     print(e)
    config error: cohort 'a': unknown key 'colour'
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from bonedrr.demo.naming import DEFAULTS as DEMO
from bonedrr.demo.naming import SEGMENTATION_DEFAULTS as DEMO_SEGMENTATION
from bonedrr.errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
#: Defaults of a cohort's ``segmentation`` block (None: nnU-Net's own choice).
SEGMENTATION_DEFAULTS = {
    "preset": "canonical", "trainer": "nnUNetTrainerNoMirroring", "epochs": None, "iterations_per_epoch": None,
    "val_iterations_per_epoch": None, "fold": "all", "configuration": "3d_fullres", "sides": "model", "plans": {},
    "labels_downstream": "predicted", "plausible_volume_cm3": {}, "seed": 0,
}
NUMERIC_COLUMNS = ("dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "xray_kvp")


def _schema(name: str) -> dict:
    path = SCHEMA_DIR / f"{name}.schema.yaml"
    if not path.is_file():
        raise ConfigError("schema not found (is the workflow folder complete?)", path)
    return yaml.safe_load(path.read_text())


def _describe(error) -> tuple[list, str]:
    """(path to the offending key, readable message) for a jsonschema error."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return path, f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(repr(k) for k in extra)}"
    if error.validator == "required":
        return path, error.message.replace("is a required property", "is required")
    if error.validator == "propertyNames" or "propertyNames" in error.absolute_schema_path:
        return path, f"name {error.instance!r} may hold only letters, digits, _ and -"
    if error.validator == "oneOf" and isinstance(error.instance, dict) and "samples" in error.schema.get(
            "properties", {}):
        return path, "needs exactly one of 'samples' (a sample sheet) or 'demo' (virtual patients)"
    if error.validator == "pattern" and path and path[-1] == "case_id":
        return path, f"{error.instance!r} is not a valid case id (letters, digits, _ and - only)"
    if error.validator == "not" and path and path[-1] == "case_id":
        return path, f"{error.instance!r} is a reserved name (a results folder of the cohort)"
    return path, error.message


def validate_config(config: dict) -> dict:
    """Validate a config dict against ``config.schema.yaml``; return it with defaults filled in.

    A demo cohort without a ``segmentation`` block gets :data:`bonedrr.demo.naming.SEGMENTATION_DEFAULTS`.

    Raises:
        ConfigError: ``config error: cohort 'NAME': field 'a.b': problem`` (or without the cohort
            for top-level keys).
    """
    error = best_match(Draft202012Validator(_schema("config")).iter_errors(config))
    if error is not None:
        path, message = _describe(error)
        if len(path) >= 2 and path[0] == "cohorts":
            where = f"cohort {path[1]!r}" + (f": field {'.'.join(map(str, path[2:]))!r}" if path[2:] else "")
        elif path == ["cohorts"] and "propertyNames" in error.absolute_schema_path:
            where = "cohorts"
        else:
            where = f"field {'.'.join(map(str, path))!r}" if path else "top level"
        raise ConfigError(f"config error: {where}: {message}")
    config = copy.deepcopy(config)
    config.setdefault("device", "auto")
    config.setdefault("proximal_femur_cut_mm", 80.0)
    config["drr"] = {"method": "siddon", "step_mm": None, **config.get("drr", {})}
    config["register"] = {"min_gc": 0.35, "seed": 0, "per_structure": False, "fine_method": "trilinear",
                          "max_restart_spread_mm": 1.0,
                          **config.get("register", {})}
    config["bmd"] = {"threshold_g_cm2": 0.05, **config.get("bmd", {})}
    config["shards"] = {"crop_mm": [240.0, 120.0], "crop_px": [128, 64], "head_position": [0.3, 0.7], "folds": 5,
                        "seed": 0, "shard_size_mb": 1000, "compression": "lzf", **config.get("shards", {})}
    config["train"] = {"threads": 2, **config.get("train", {})}  # other defaults: bonedrr.train.TrainSettings
    input_scale = config["train"].get("input_scale", "overview")  # TrainSettings' default
    for key in ("input_span", "open_beam"):  # caught here, not hours later by the train job
        if config["train"].get(key) is not None and input_scale != "detector":
            raise ConfigError(f"config error: field 'train.{key}': is for input_scale detector, not {input_scale!r}")
    config["validate"] = {"folds": None, "jpeg_qualities": [95, 75, 50, 30, 20, 10, 5, 3, 1], "jpeg_ratios": [50],
                          "examples": 4,
                          **config.get("validate", {})}
    if config["validate"]["folds"] and max(config["validate"]["folds"]) >= config["shards"]["folds"]:
        raise ConfigError(f"config error: field 'validate.folds': folds are 0..{config['shards']['folds'] - 1} "
                          f"(shards.folds is {config['shards']['folds']})")
    if config["shards"]["crop_px"][0] != 2 * config["shards"]["crop_px"][1]:
        raise ConfigError(f"config error: field 'shards.crop_px': {config['shards']['crop_px']} is not portrait 2:1 "
                          "(rows = 2 x cols)")
    for name, cohort in config["cohorts"].items():
        cohort["xray"] = {"sdd_mm": DEMO["sdd_mm"], "pixel_mm": list(DEMO["pixel_mm"]), **cohort.get("xray", {})}
        if "demo" in cohort:  # the demo's scans carry its phantom
            cohort["calibration"] = {"method": "phantom", "phantom_rods_mg_cm3": list(DEMO["phantom_rods_mg_cm3"]),
                                     **cohort.get("calibration", {})}
        calibration = cohort.setdefault("calibration", {"method": "phantom"})
        needs = {"phantom": "phantom_rods_mg_cm3", "scanner": "scanners"}.get(calibration["method"])
        if needs and needs not in calibration:
            raise ConfigError(f"config error: cohort {name!r}: field 'calibration': method "
                              f"{calibration['method']!r} needs {needs!r}")
        if "demo" in cohort:
            defaults = {k: DEMO[k] for k in ("rows", "cols", "nifti_png_every", "template", "extra_views",
                                              "views_protocol", "sites", "presentation")}
            cohort["demo"] = {**defaults, "abmd_range": list(DEMO["abmd_range"]), **cohort["demo"]}
            cohort.setdefault("segmentation", copy.deepcopy(DEMO_SEGMENTATION))
        if "segmentation" in cohort:
            cohort["segmentation"] = {**SEGMENTATION_DEFAULTS, "device": config["device"], **cohort["segmentation"]}
    return config


def read_samplesheet(path: str | Path, cohort: str, config: dict | None = None,
                     check_files: bool = True) -> dict[str, dict]:
    """Read and check a cohort's sample sheet.

    Args:
        path: The TSV file.
        cohort: The cohort's name (for messages).
        config: The cohort's validated config (for scanner names), or None.
        check_files: Check that every CT, radiograph and label path exists.

    Returns:
        case id -> row, with paths made absolute (relative paths are relative to the sheet) and
        numbers parsed; ``side`` defaults to ``both``.

    Raises:
        ConfigError: ``config error: cohort 'c', sample sheet s.tsv line 3 (case 'x'), field 'f': problem``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: cohort {cohort!r}: sample sheet not found: {path}")
    validator = Draft202012Validator(_schema("samples"))
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "case_id" not in reader.fieldnames:
            raise ConfigError(f"config error: cohort {cohort!r}, sample sheet {path}: the header line must name "
                              "the columns, case_id first (tab-separated)")
        rows = list(enumerate(reader, start=2))
    if not rows:
        raise ConfigError(f"config error: cohort {cohort!r}, sample sheet {path}: no cases")
    scanners = ((config or {}).get("calibration") or {}).get("scanners", {})
    cases: dict[str, dict] = {}
    for line, raw in rows:
        def fail(field, message):
            case = raw.get("case_id") or "?"
            raise ConfigError(f"config error: cohort {cohort!r}, sample sheet {path.name} line {line} "
                              f"(case {case!r}), field {field!r}: {message}")
        if None in raw:
            fail("(extra cell)", "more cells than header columns")
        row = {k: v.strip() for k, v in raw.items() if k is not None and v is not None and v.strip() != ""}
        for column in NUMERIC_COLUMNS:
            if column in row:
                try:
                    row[column] = float(row[column])
                except ValueError:
                    pass  # the schema reports it as "is not of type 'number'"
        error = best_match(validator.iter_errors(row))
        if error is not None:
            field_path, message = _describe(error)
            if error.validator == "additionalProperties":
                extra = sorted(set(row) - set(validator.schema["properties"]))
                fail(extra[0], f"unknown column {extra[0]!r}")
            fail(".".join(map(str, field_path)) or "(row)", message)
        row.setdefault("side", "both")
        if row["case_id"] in cases:
            fail("case_id", f"duplicate case id {row['case_id']!r} (first used on an earlier line)")
        for column in ("ct", "xray", "labels"):
            if column in row:
                p = Path(row[column])
                row[column] = str(p if p.is_absolute() else (path.parent / p).resolve())
                if check_files and not Path(row[column]).exists():
                    fail(column, f"file not found: {row[column]}")
        if "scanner" in row and scanners and row["scanner"] not in scanners:
            fail("scanner", f"scanner {row['scanner']!r} is not in calibration.scanners "
                            f"({', '.join(sorted(scanners))})")
        cases[row["case_id"]] = row
    return cases


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError("config file not found", path) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML ({e})".replace("\n", " "), path) from e
    return validate_config(config or {})


def demo_case_ids(cohort_config: dict) -> list[str]:
    """Case ids of a demo cohort (known before its files exist)."""
    from bonedrr.demo.naming import case_id

    return [case_id(i) for i in range(cohort_config["demo"]["n_patients"])]


def cohort_cases(config: dict, base_dir: str | Path = ".") -> dict[str, dict[str, dict]]:
    """Every cohort's cases: cohort -> case id -> sample-sheet row (demo cohorts: ``{"index": i}``).

    Sample sheets are read and checked here, so that a bad row stops the workflow before any job runs.
    """
    out = {}
    for name, cohort in config["cohorts"].items():
        if "demo" in cohort:
            out[name] = {cid: {"case_id": cid, "index": i} for i, cid in enumerate(demo_case_ids(cohort))}
        else:
            sheet = Path(cohort["samples"])
            out[name] = read_samplesheet(sheet if sheet.is_absolute() else Path(base_dir) / sheet, name, cohort)
    return out
