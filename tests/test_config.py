"""Config and sample-sheet validation: each mistake stops with one message naming cohort, row and field."""

from pathlib import Path

import pytest
import yaml

from bonedrr.config import cohort_cases, load_config, read_samplesheet, validate_config
from bonedrr.demo.xray_physics import RAW_OPEN_BEAM
from bonedrr.errors import ConfigError
from bonedrr.train import TrainSettings

from conftest import REPO

HEADER = "case_id\tct\txray\tside\tdxa_abmd_left\n"


@pytest.fixture
def files(tmp_path) -> Path:
    for name in ("a_ct.nii.gz", "a.dcm", "b_ct.nii.gz", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def sheet(tmp_path, body: str, header: str = HEADER) -> Path:
    p = tmp_path / "cohort.tsv"
    p.write_text(header + body)
    return p


PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200]}


def config_for(path: Path) -> dict:
    return validate_config({"cohorts": {"hosp": {"samples": str(path), "calibration": PHANTOM}}})


def test_default_config_is_valid_and_lists_the_demo_cases():
    config = load_config(REPO / "config" / "config.yaml")
    cases = cohort_cases(config, REPO)
    assert list(cases) == ["demo"]
    assert list(cases["demo"])[:2] == ["demo_000", "demo_001"]
    assert len(cases["demo"]) == config["cohorts"]["demo"]["demo"]["n_patients"]
    assert config["cohorts"]["demo"]["xray"]["pixel_mm"] == [1.4, 1.4]


def test_the_validation_configs_load_over_the_default_as_snakemake_merges_them(tmp_path):
    """config/validation.yaml, and validation_raw.yaml on top of it, merged into config.yaml the way
    Snakemake's --configfile merges (nested keys update), give a valid config with what they promise."""
    def merge(a: dict, b: dict) -> dict:
        for key, value in b.items():
            a[key] = merge(a[key], value) if isinstance(value, dict) and isinstance(a.get(key), dict) else value
        return a

    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for name in ("validation.yaml", "validation_raw.yaml"):
        merged = merge(merged, yaml.safe_load((REPO / "config" / name).read_text()))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merged))
        config = load_config(path)
        assert config["cohorts"]["demo"]["demo"]["n_patients"] == 80
    assert config["cohorts"]["demo"]["demo"]["presentation"] == "raw" and config["cohorts"]["demo"]["demo"]["sites"] == 1
    assert config["train"]["input_scale"] == "detector" and config["train"]["network"]["equivariant"] is True
    settings = TrainSettings.from_config(config["train"])  # as the train rule builds them
    assert settings.open_beam == RAW_OPEN_BEAM == 1000.0 and settings.input_scale == "detector"
    assert config["train"]["network"]["base_channels"] == 16  # the default's, kept by the merge


@pytest.mark.parametrize("config, message", [
    ({"cohorts": {"hosp": {"samples": "a.tsv", "colour": "red"}}},
     "config error: cohort 'hosp': unknown key 'colour'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "xray": {"sdd_mm": "far"}}}},
     "config error: cohort 'hosp': field 'xray.sdd_mm': 'far' is not of type 'number'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "xray": {"pixel_mm": [0.15]}}}},
     "config error: cohort 'hosp': field 'xray.pixel_mm': [0.15] is too short"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "magic"}}}},
     "config error: cohort 'hosp': field 'calibration.method': 'magic' is not one of ['phantom', 'scanner', 'internal']"),
    ({"cohorts": {"hosp": {"xray": {"sdd_mm": 1000}}}},
     "config error: cohort 'hosp': needs exactly one of 'samples' (a sample sheet) or 'demo' (virtual patients)"),
    ({"cohorts": {"sim": {"demo": {"n_patients": 2, "seed": 1, "sites": -1}}}},
     "config error: cohort 'sim': field 'demo.sites': -1 is less than the minimum of 0"),
    ({"cohorts": {"sim": {"demo": {"n_patients": 2, "seed": 1, "presentation": "film"}}}},
     "config error: cohort 'sim': field 'demo.presentation': 'film' is not one of ['processed', 'raw']"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "demo": {"n_patients": 2, "seed": 1}}}},
     "config error: cohort 'hosp': needs exactly one of 'samples' (a sample sheet) or 'demo' (virtual patients)"),
    ({"cohorts": {"../up": {"samples": "a.tsv"}}},
     "config error: cohorts: name '../up' may hold only letters, digits, _ and -"),
    ({"cohorts": {"hosp": {"samples": "a.tsv"}}, "devise": "cpu"},
     "config error: top level: unknown key 'devise'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv"}}, "device": "tpu"},
     "config error: field 'device': 'tpu' is not one of ['auto', 'cpu', 'cuda']"),
    ({"cohorts": {}}, "config error: field 'cohorts': {} should be non-empty"),
    ({}, "config error: top level: 'cohorts' is required"),
    ({"cohorts": {"hosp": {"samples": "a.tsv"}}},
     "config error: cohort 'hosp': field 'calibration': method 'phantom' needs 'phantom_rods_mg_cm3'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "scanner"}}}},
     "config error: cohort 'hosp': field 'calibration': method 'scanner' needs 'scanners'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "internal"}}}, "train": {"open_beam": 1000}},
     "config error: field 'train.open_beam': is for input_scale detector, not 'overview'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "internal"}}},
      "train": {"input_scale": "crop", "input_span": 2000}},
     "config error: field 'train.input_span': is for input_scale detector, not 'crop'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "internal"}}}, "train": {"open_beam": "air"}},
     "config error: field 'train.open_beam': 'air' is not of type 'number', 'null'"),
    ({"cohorts": {"hosp": {"samples": "a.tsv", "calibration": {"method": "internal"}}}, "validate": {"jpeg_ratios": [50, 0.5]}},
     "config error: field 'validate.jpeg_ratios.1': 0.5 is less than or equal to the minimum of 1"),
])
def test_config_errors_name_cohort_and_field(config, message):
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value) == message


def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("cohorts: {hosp: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: config is not valid YAML"):
        load_config(p)


def test_valid_samplesheet_resolves_paths_relative_to_the_sheet(files):
    p = sheet(files, "a\ta_ct.nii.gz\ta.dcm\tleft\t0.81\nb\tb_ct.nii.gz\tb.png\t\t\n")
    cases = read_samplesheet(p, "hosp", config_for(p))
    assert cases["a"]["ct"] == str(files / "a_ct.nii.gz")
    assert cases["a"]["dxa_abmd_left"] == pytest.approx(0.81)
    assert cases["b"]["side"] == "both" and "dxa_abmd_left" not in cases["b"]


@pytest.mark.parametrize("body, header, message", [
    ("a\ta_ct.nii.gz\ta.dcm\tleft\t0.8\na\tb_ct.nii.gz\tb.png\tleft\t0.7\n", HEADER,
     "line 3 (case 'a'), field 'case_id': duplicate case id 'a' (first used on an earlier line)"),
    ("../x\ta_ct.nii.gz\ta.dcm\tleft\t0.8\n", HEADER,
     "line 2 (case '../x'), field 'case_id': '../x' is not a valid case id (letters, digits, _ and - only)"),
    ("a b\ta_ct.nii.gz\ta.dcm\tleft\t0.8\n", HEADER,
     "line 2 (case 'a b'), field 'case_id': 'a b' is not a valid case id (letters, digits, _ and - only)"),
    ("shards\ta_ct.nii.gz\ta.dcm\tleft\t0.8\n", HEADER,
     "line 2 (case 'shards'), field 'case_id': 'shards' is a reserved name (a results folder of the cohort)"),
    ("a\tmissing.nii.gz\ta.dcm\tleft\t0.8\n", HEADER,
     "line 2 (case 'a'), field 'ct': file not found: "),
    ("a\ta_ct.nii.gz\ta.dcm\tmiddle\t0.8\n", HEADER,
     "line 2 (case 'a'), field 'side': 'middle' is not one of ['left', 'right', 'both']"),
    ("a\ta_ct.nii.gz\ta.dcm\tleft\tlow\n", HEADER,
     "line 2 (case 'a'), field 'dxa_abmd_left': 'low' is not of type 'number'"),
    ("a\ta_ct.nii.gz\ta.png\t8\n", "case_id\tct\txray\txray_kvp\n",
     "line 2 (case 'a'), field 'xray_kvp': 8.0 is less than or equal to the minimum of 20"),
    ("a\ta_ct.nii.gz\ta.dcm\tleft\t0.8\t1\n", "case_id\tct\txray\tside\tdxa_abmd_left\tweight_kg\n",
     "line 2 (case 'a'), field 'weight_kg': unknown column 'weight_kg'"),
    ("a\ta_ct.nii.gz\tleft\t0.8\n", "case_id\tct\tside\tdxa_abmd_left\n",
     "line 2 (case 'a'), field '(row)': 'xray' is required"),
])
def test_samplesheet_errors_name_cohort_row_and_field(files, body, header, message):
    p = sheet(files, body, header)
    with pytest.raises(ConfigError) as e:
        read_samplesheet(p, "hosp", config_for(p))
    assert str(e.value).startswith(f"config error: cohort 'hosp', sample sheet cohort.tsv {message}")


def test_unknown_scanner_is_named(files):
    p = sheet(files, "a\ta_ct.nii.gz\ta.dcm\t\n", "case_id\tct\txray\tscanner\n")
    (files / "cohort.tsv").write_text("case_id\tct\txray\tscanner\na\ta_ct.nii.gz\ta.dcm\tCT9\n")
    cfg = validate_config({"cohorts": {"hosp": {"samples": str(p), "calibration": {
        "method": "scanner", "scanners": {"CT1": {"slope": 1.0, "intercept": 0.0}}}}}})
    with pytest.raises(ConfigError, match=r"field 'scanner': scanner 'CT9' is not in calibration.scanners \(CT1\)"):
        read_samplesheet(p, "hosp", cfg["cohorts"]["hosp"])


def test_missing_samplesheet_and_several_cohorts(files, tmp_path):
    p = sheet(files, "a\ta_ct.nii.gz\ta.dcm\tleft\t0.8\n")
    config = validate_config({"cohorts": {
        "hosp": {"samples": str(p), "calibration": PHANTOM}, "demo": {"demo": {"n_patients": 3, "seed": 1}},
        "gone": {"samples": "nowhere.tsv", "calibration": PHANTOM}}})
    with pytest.raises(ConfigError, match="cohort 'gone': sample sheet not found"):
        cohort_cases(config, tmp_path)
    del config["cohorts"]["gone"]
    cases = cohort_cases(config, tmp_path)
    assert list(cases["hosp"]) == ["a"] and list(cases["demo"]) == ["demo_000", "demo_001", "demo_002"]


def test_config_schema_documents_every_key():
    """config/README.md names every key the schema allows."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (REPO / "config" / "README.md").read_text()
    keys = set(schema["properties"]) | set(schema["$defs"]["cohort"]["properties"])
    for block in ("demo", "xray", "calibration", "segmentation"):
        keys |= set(schema["$defs"]["cohort"]["properties"][block]["properties"])
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"config/README.md does not document {missing}"


def test_every_default_of_the_schema_is_filled_in_by_validate_config():
    """The rules read settings from the validated config: a key the schema gives a default must be there
    when the user leaves it out (a missing one failed only when a job ran, with a KeyError)."""
    from bonedrr.config import _schema

    config = config_for(Path("a.tsv"))
    checked = []
    for block, spec in _schema("config")["properties"].items():
        defaults = {key: item["default"] for key, item in spec.get("properties", {}).items() if "default" in item}
        if defaults and block != "train":  # train's defaults: bonedrr.train.TrainSettings
            assert {key: config[block].get(key, "missing") for key in defaults} == defaults, block
            checked.append(block)
    assert {"drr", "register", "bmd", "shards"} <= set(checked)
