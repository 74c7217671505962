"""Fuzzing the DICOM readers: any mutant of a valid radiograph or CT series is read, or refused with
the project's one-line InputError naming the file; nothing else escapes. Hypothesis drives the seeds
(a few hundred examples per CI run, saved failures replayed first); scripts/fuzz_dicom.py runs the
same mutations for hours and records its runs in benchmarks/results/fuzz_dicom.json.
"""

import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bonedrr.dicom import read_ct_series, read_radiograph
from bonedrr.errors import InputError

from dicom_fuzzing import mutant, small_ct, small_dx

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_seeds")
    return {"dx": small_dx(d / "dx.dcm").read_bytes(),
            "dx_mono1": small_dx(d / "dx1.dcm", "MONOCHROME1", 16).read_bytes(),
            "ct": small_ct(d / "ct")}


def test_seeds_are_valid(seeds, tmp_path):
    (tmp_path / "x.dcm").write_bytes(seeds["dx"])
    assert read_radiograph(tmp_path / "x.dcm").pixels.shape == (24, 32)
    image, _ = read_ct_series(seeds["ct"])
    assert image.GetSize() == (16, 16, 4)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(["dx", "dx_mono1"]))
def test_radiograph_reader_never_crashes(seeds, tmp_path, seed, which):
    path = tmp_path / "x.dcm"
    path.write_bytes(mutant(seeds[which], seed))
    try:
        read_radiograph(path, default_pixel_mm=None)
    except InputError as e:
        assert str(path) in str(e) and "\n" not in str(e)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), slice_index=st.integers(0, 3))
def test_ct_reader_never_crashes(seeds, tmp_path, seed, slice_index):
    folder = tmp_path / f"ct_{seed}"
    shutil.copytree(seeds["ct"], folder)
    victim = sorted(folder.iterdir())[slice_index]
    victim.write_bytes(mutant(victim.read_bytes(), seed))
    try:
        read_ct_series(folder)
    except InputError as e:
        assert str(folder) in str(e) and "\n" not in str(e)
    finally:
        shutil.rmtree(folder)
