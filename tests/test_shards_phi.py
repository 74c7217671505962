"""No identifying DICOM content reaches a shard, an index, a manifest, a log or a report.

Every identifying tag of a virtual patient's CT series and radiograph (DICOM PS3.15 basic profile:
names, ids, dates, times, institutions, descriptions, UIDs, ...) is filled with a unique marker, and
its input folder's name is a marker too. The case then goes through every stage by the CLI, as the
workflow runs it (ingest, labels, calibrate, drr, bmd, the cohort tables, pack), with each stage's stderr
as its log. Registration is replaced by the demo's true pose to keep this test short (registration
takes minutes on a busy 2-core machine): it reads only ingest's outputs, which are checked here, and
test_workflow.py checks its outputs and logs for the demo's own identifying values. No marker may appear in any byte of what is written, decompressed
(``.gz``) and read out of HDF5 (``.h5``: every attribute and dataset).
"""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

#: Identifying attributes and their value representations (PS3.15 Annex E, basic profile).
IDENTIFYING = {
    "PN": ["PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "ReferringPhysicianName",
           "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord",
           "RequestingPhysician", "ContentCreatorName", "ResponsiblePerson"],
    "LO": ["PatientID", "IssuerOfPatientID", "OtherPatientIDs", "InstitutionName", "InstitutionalDepartmentName",
           "StudyDescription", "SeriesDescription", "ProtocolName", "PatientAddress", "MedicalRecordLocator",
           "RequestedProcedureDescription", "PerformedProcedureStepDescription", "DeviceSerialNumber",
           "CountryOfResidence", "RegionOfResidence", "MilitaryRank", "BranchOfService", "PatientReligiousPreference",
           "ResponsibleOrganization"],
    "SH": ["AccessionNumber", "StudyID", "StationName", "PatientTelephoneNumbers", "EthnicGroup", "Occupation",
           "PerformedProcedureStepID", "RequestedProcedureID", "ScheduledProcedureStepID"],
    "LT": ["AdditionalPatientHistory", "PatientComments", "ImageComments"],
    "ST": ["InstitutionAddress", "DerivationDescription"],
    "DA": ["PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
           "PerformedProcedureStepStartDate", "LastMenstrualDate"],
    "TM": ["PatientBirthTime", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
           "PerformedProcedureStepStartTime"],
    "DT": ["AcquisitionDateTime"],
    "AS": ["PatientAge"],
    "DS": ["PatientWeight", "PatientSize"],
    "UI": ["StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"],
}
UID_ROOT = "1.2.826.0.1.3680043.10.54321"  # markers of UIDs all start with it


def markers() -> dict[str, str]:
    """A unique, valid value per attribute; per VR they cannot occur by chance."""
    values = {}
    for n, (vr, keywords) in enumerate(IDENTIFYING.items()):
        for m, kw in enumerate(keywords):
            code = f"{n:02d}{m:02d}"
            values[kw] = {
                "DA": f"1907{code}"[:8], "TM": f"0{code[1:]}01.4{code}", "DT": f"19070809{code}01.9876",
                "AS": "097Y", "DS": f"7{code}.321", "UI": f"{UID_ROOT}.{code}",
            }.get(vr, f"ZQ{code}MRK")
    return values


def fill(path: Path, values: dict, instance: int) -> None:
    ds = pydicom.dcmread(path)
    for kw, value in values.items():
        if kw == "SOPInstanceUID":
            value = f"{value}.{instance}"
            ds.file_meta.MediaStorageSOPInstanceUID = value
        setattr(ds, kw, value)
    ds.save_as(path, enforce_file_format=True)


def readable_content(path: Path) -> bytes:
    """Every byte of a file, with .gz decompressed and HDF5 read out (attributes, data, names)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".h5":
        parts = [data]

        def visit(name, obj):
            parts.append(name.encode())
            for key, value in obj.attrs.items():
                parts.append(f"{key}={value}".encode())
            if isinstance(obj, h5py.Dataset):
                array = obj[...]
                parts.append(b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel())
                             if array.dtype.kind == "O" else np.ascontiguousarray(array).tobytes())

        with h5py.File(path, "r") as f:
            for key, value in f.attrs.items():
                parts.append(f"{key}={value}".encode())
            f.visititems(visit)
        return b"\n".join(parts)
    return data


def test_no_identifying_dicom_content_reaches_shards_logs_or_reports(demo_cases, tmp_path):
    folder, settings, truths = demo_cases
    truth = truths[0]
    assert truth["files"]["xray"] == "xray.dcm" and truth["files"]["ct"] == "ct"  # DICOM CT and DX
    source = shutil.copytree(folder / truth["case_id"], tmp_path / "ZQ9999PATHMRK" / "input")
    values = markers()
    fill(source / "xray.dcm", values, 0)
    for k, path in enumerate(sorted((source / "ct").glob("*.dcm"))):
        fill(path, values, k + 1)
    assert str(pydicom.dcmread(source / "xray.dcm").InstitutionName) == values["InstitutionName"]

    results = tmp_path / "results" / "hosp"
    case = results / "c01"
    logs = results / "logs"

    def bonedrr(stage, *args):
        (logs / stage).mkdir(parents=True, exist_ok=True)
        with open(logs / stage / "c01.log", "w") as log:
            result = subprocess.run([sys.executable, "-m", "bonedrr", stage, *map(str, args)], stderr=log,
                                    env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)
        assert result.returncode == 0, (logs / stage / "c01.log").read_text()

    bonedrr("ingest", "--case-id", "c01", "--ct", source / "ct", "--xray", source / "xray.dcm", "--out", case,
            "--cohort", "hosp", "--dxa-abmd-left", "0.8", "--patient-id", "p01")
    bonedrr("ingest-labels", "--labels", source / "labels.nii.gz", "--ct", case / "ct.nii.gz",
            "--out", case / "labels.nii.gz")
    bonedrr("ingest-overview", "--cases", case, "--png", results / "qc" / "ingest.png",
            "--table", results / "qc" / "ingest.tsv")
    bonedrr("calibrate", "--ct", case / "ct.nii.gz", "--labels", case / "labels.nii.gz", "--out", case,
            "--method", "phantom", "--rods", 0, 100, 200, 400, 800, "--case", case / "case.json")
    geometry = truth["geometry"]  # instead of `bonedrr register` (see the module docstring)
    (case / "pose.json").write_text(json.dumps({"world_to_camera": geometry["world_to_camera"], "geometry": geometry,
                                                "similarity_value": 0.7, "converged": True, "qa_flags": [],
                                                "evaluations": 0}))
    bonedrr("registration-summary", "--cases", case, "--out", results / "qc" / "registration.tsv")
    bonedrr("drr", "--density", case / "density.nii.gz", "--labels", case / "labels.nii.gz",
            "--geometry", case / "pose.json", "--xray", case / "xray.nii.gz", "--out", case / "drr.h5",
            "--png", case / "drr.png", "--device", "cpu")
    bonedrr("bmd", "--density", case / "density.nii.gz", "--labels", case / "labels.nii.gz", "--drr", case / "drr.h5",
            "--case", case / "case.json", "--calibration", case / "calibration.json", "--out", case / "bmd.json")
    bonedrr("bmd-summary", "--cases", case, "--out", results / "qc" / "bmd.tsv")
    bonedrr("pack", "--cases", case, "--out", results / "shards", "--cohort", "hosp", "--crop-px", 64, 32)

    shards = sorted(p.name for p in (results / "shards").iterdir())
    assert "manifest.json" in shards and "shard_00000.h5" in shards and "index.csv" in shards
    assert (results / "shards" / "index.csv").read_text().count("\n") == 3  # both hips packed
    needles = [v.encode() for v in values.values() if not v.startswith(UID_ROOT)]
    needles += [UID_ROOT.encode(), b"ZQ9999PATHMRK", str(source).encode()]
    checked = []
    for path in sorted(tmp_path.joinpath("results").rglob("*")):
        if path.is_file():
            content = readable_content(path)
            found = [n.decode() for n in needles if n in content]
            assert not found, f"{path.relative_to(tmp_path)} holds {found}"
            checked.append(path.relative_to(results).as_posix())
    for expected in ("shards/shard_00000.h5", "shards/index.csv", "shards/manifest.json", "shards/splits.json",
                     "logs/pack/c01.log", "logs/ingest/c01.log", "qc/bmd.tsv", "qc/registration.tsv",
                     "c01/case.json", "c01/bmd.json", "c01/drr.h5", "c01/xray.nii.gz", "c01/drr.png"):
        assert expected in checked
