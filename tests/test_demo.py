"""The demo cohort: its physics, its projector, its virtual patients and their ground truth."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.demo import virtual_patient as vp
from bonedrr.demo.projector import project
from bonedrr.demo.xray_physics import mass_attenuation, primary_transmission, spectrum
from bonedrr.geometry import Geometry, ap_pose
from bonedrr.images import world_axis_grid
from bonedrr.labels import CANONICAL_LABELS, proximal_femur_mask


def test_spectrum_and_attenuation():
    e, w = spectrum(80.0, al_mm=2.5)
    assert w.sum() == pytest.approx(1.0)
    assert 40 < (e * w).sum() < 55  # energy-weighted mean of a filtered 80 kVp beam
    # Bone mineral's contrast against water falls with energy (photoelectric effect).
    ratio = [mass_attenuation("mineral", x) / mass_attenuation("water", x) for x in (30.0, 60.0, 100.0)]
    assert ratio[0] > ratio[1] > ratio[2] > 1
    assert mass_attenuation("water", 60.0) == pytest.approx(0.2059, rel=1e-6)


def test_beam_hardening_differs_from_the_pipelines_monochromatic_model():
    thickness = np.array([1.0, 10.0, 20.0, 30.0])  # g/cm2 of water
    zero = np.zeros_like(thickness)
    t = primary_transmission({"mineral": zero, "water": thickness, "fat": zero}, 80.0, 2.5)
    mu_eff = -np.log(t) / thickness
    assert np.all(np.diff(mu_eff) < 0)  # each extra cm attenuates less: a line integral is not enough
    assert 0.17 < mu_eff[-1] < 0.25


def test_projector_matches_analytic_chords_through_a_box():
    # A 60 x 40 x 30 mm box of density 1 g/cm3 in a volume of 2 mm voxels, centred at the origin.
    size = (50, 40, 45)  # x, y, z voxels
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin(tuple(-(n - 1) for n in size))
    x = world_axis_grid(grid, 0)
    y = world_axis_grid(grid, 1)
    z = world_axis_grid(grid, 2)
    box = ((np.abs(x) < 30) & (np.abs(y) < 20) & (np.abs(z) < 15)).astype(np.float32)
    g = Geometry.centered(1000.0, 9, 9, (10.0, 10.0), ap_pose([0, 0, 0], 700.0))
    out = project({"box": box}, grid, g, step_mm=0.25)["box"]
    # The central ray crosses 40 mm (the box's y extent): 4 g/cm2.
    assert out[4, 4] == pytest.approx(4.0, rel=0.01)
    # An oblique ray through the box's front and back faces: 40 mm / cos(angle).
    direction = g.pixel_centers_camera()[4, 6]
    cos = direction[2] / np.linalg.norm(direction)
    assert out[4, 6] == pytest.approx(4.0 / cos, rel=0.01)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-6)  # misses the box


@pytest.fixture(scope="module")
def template():
    return vp.load_template()


def test_template_has_no_metal_and_materials_rebuild_its_hu(template):
    assert template.true_hu().max() < vp.METAL_HU
    assert template.mineral.min() >= 0
    bone = np.isin(template.labels, [CANONICAL_LABELS[n] for n in vp.BONE_LABELS])
    assert not template.mineral[~bone].any()


def test_drawn_dxa_comes_true_and_qct_follows(template):
    rng = np.random.default_rng(3)
    params = vp.draw_params(rng, {"left": 0.7, "right": 0.5})
    values = []
    for target in (0.5, 0.8, 1.1):
        params.side_dxa_abmd = {"left": target, "right": target * 1.05}
        patient = vp.make_patient(template, params)
        assert vp.dxa_abmd(patient, "left", 80.0) == pytest.approx(target, rel=1e-4)
        assert vp.dxa_abmd(patient, "right", 80.0) == pytest.approx(target * 1.05, rel=1e-4)
        values.append(vp.qct_vbmd(patient, "left", 80.0))
    assert values[0] < values[1] < values[2]
    assert 0.5 < values[0] / values[2] * 1.1 / 0.5 < 1.5  # vBMD grows about in proportion


def test_phantom_recovers_the_scanner_calibration(template):
    rng = np.random.default_rng(11)
    params = vp.draw_params(rng, {"left": 0.7, "right": 0.5})
    patient = vp.make_patient(template, params)
    hu = vp.scanned_hu(patient, params, rng)
    from scipy import ndimage
    means = [hu[ndimage.binary_erosion(np.asarray(m), iterations=1)].mean() for m in vp.phantom_rod_masks(patient)]
    slope, intercept = np.polyfit(vp.PHANTOM_RODS_MG_CM3, means, 1)
    assert slope == pytest.approx(params.scanner_slope * vp.HA_HU_PER_MG, rel=0.01)
    assert intercept == pytest.approx(params.scanner_intercept, abs=3.0)
    # The phantom is outside the body: no bone label overlaps a rod.
    assert not (patient.labels[np.asarray(vp.phantom_rod_masks(patient)[0])] > 0).any()


def test_demo_case_files_and_truth(demo_cases):
    folder, settings, truths = demo_cases
    dicom_case, png_case = folder / "demo_000", folder / "demo_001"
    assert sorted(p.name for p in dicom_case.iterdir()) == ["ct", "labels.nii.gz", "preview.png", "truth.json",
                                                           "xray.dcm"]
    assert sorted(p.name for p in png_case.iterdir()) == ["ct.nii.gz", "labels.nii.gz", "preview.png",
                                                         "truth.json", "xray.png"]
    for truth in truths:
        assert json.loads((folder / truth["case_id"] / "truth.json").read_text())["case_id"] == truth["case_id"]
        for side in ("left", "right"):
            assert 0.2 < truth["dxa_total_hip_abmd_g_cm2"][side] < 1.6
            assert 60 < truth["qct_vbmd_mg_cm3"][side] < 500
        # The true pose puts both proximal femurs (the BMD regions) inside the radiograph.
        g = Geometry.from_dict(truth["geometry"])
        labels = sitk.ReadImage(str(folder / truth["case_id"] / "labels.nii.gz"))
        arr = sitk.GetArrayFromImage(labels)
        for side in ("left", "right"):
            region = proximal_femur_mask(arr, side, world_axis_grid(labels, 2), truth["proximal_femur_cut_mm"])
            points = np.array([labels.TransformIndexToPhysicalPoint(idx[::-1].tolist())
                               for idx in np.argwhere(region)])
            rc = g.project(points)
            assert rc[:, 0].min() > 0 and rc[:, 0].max() < g.rows - 1
            assert rc[:, 1].min() > 0 and rc[:, 1].max() < g.cols - 1
        assert truth["clinical"]["side"] == "both"


def test_demo_case_is_reproducible(tmp_path, demo_cases):
    from bonedrr.demo.cohort import draw_patient, make_case
    folder, settings, truths = demo_cases
    again = make_case(tmp_path / "demo_001", "demo_001", 1, settings)
    assert json.dumps(again, sort_keys=True) == json.dumps(truths[1], sort_keys=True)
    assert (tmp_path / "demo_001" / "xray.png").read_bytes() == (folder / "demo_001" / "xray.png").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # The patient alone, without its files, is the case's patient (what experiments re-simulate).
    patient, params, _ = draw_patient(1, settings)
    assert params.to_dict() == truths[1]["patient"]
    for side in ("left", "right"):
        assert vp.qct_vbmd(patient, side, truths[1]["proximal_femur_cut_mm"]) == truths[1]["qct_vbmd_mg_cm3"][side]


def test_extra_views_differ_in_pose_carry_no_phi_and_leave_the_case_unchanged(demo_cases, demo_case_with_views):
    import pydicom

    folder, settings, truths = demo_cases
    case = demo_case_with_views
    truth = json.loads((case / "truth.json").read_text())
    # The case itself is the one made without views: same truth, same radiograph.
    assert json.dumps(truth, sort_keys=True) == json.dumps(truths[0], sort_keys=True)
    assert (case / "xray.dcm").read_bytes() == (folder / "demo_000" / "xray.dcm").read_bytes()
    views = json.loads((case / "views" / "views.json").read_text())
    assert [v["file"] for v in views["views"]] == ["view1.dcm", "view2.dcm"]
    poses = [np.asarray(truth["geometry"]["world_to_camera"])] + [
        np.asarray(v["geometry"]["world_to_camera"]) for v in views["views"]]
    for i in range(len(poses)):
        for j in range(i + 1, len(poses)):
            # Rotations differ by more than half a degree, or positions by more than a millimetre.
            angle = np.degrees(np.arccos(np.clip((np.trace(poses[i][:3, :3].T @ poses[j][:3, :3]) - 1) / 2, -1, 1)))
            assert angle > 0.5 or np.linalg.norm(poses[i][:3, 3] - poses[j][:3, 3]) > 1.0
    main = pydicom.dcmread(case / "xray.dcm")
    for v in views["views"]:
        ds = pydicom.dcmread(case / "views" / v["file"])
        assert ds.Rows == settings.rows and ds.Columns == settings.cols
        assert [float(s) for s in ds.ImagerPixelSpacing] == list(settings.pixel_mm)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
                    "AccessionNumber", "StudyDate"):
            assert not str(ds.get(tag, "")), tag
        raw = (case / "views" / v["file"]).read_bytes()
        assert str(main.PatientName).encode() not in raw and str(main.PatientID).encode() not in raw
        assert ds.pixel_array.std() > 1000  # an image, not a blank


def test_extra_views_repeat_the_cases_protocol_unless_random(demo_cases, demo_case_with_views, tmp_path):
    import dataclasses

    import pydicom

    from bonedrr.demo.cohort import DemoSettings, draw_patient, make_case, simulate_view
    from bonedrr.demo.xray_physics import XrayExposure
    from bonedrr.errors import BonedrrError

    truth = json.loads((demo_case_with_views / "truth.json").read_text())
    views = json.loads((demo_case_with_views / "views" / "views.json").read_text())
    assert views["protocol"] == "same"
    protocol = ("kvp", "al_mm", "scatter_sigma_mm", "blur_px", "window_low_pct", "window_high_pct", "gamma",
                "unsharp_amount", "unsharp_sigma_mm")
    for v in views["views"]:
        assert {k: v["exposure"][k] for k in protocol} == {k: truth["exposure"][k] for k in protocol}
        # A new acquisition: the dose within +-26 %, the scatter within +-10 %, neither the case's own.
        dose = v["exposure"]["photons_per_pixel"] / truth["exposure"]["photons_per_pixel"]
        assert 10 ** -0.1 <= dose <= 10 ** 0.1 and dose != 1
        scatter = v["exposure"]["scatter_to_primary"] / truth["exposure"]["scatter_to_primary"]
        assert 0.9 <= scatter <= 1.1 and scatter != 1
        assert float(pydicom.dcmread(demo_case_with_views / "views" / v["file"]).KVP) == truth["exposure"]["kvp"]

    # simulate_view, what the benchmarks make views with, is the image the case folder holds.
    _, settings, _ = demo_cases
    patient, _, _ = draw_patient(0, settings)
    view = simulate_view(patient, truth["view_centre_world_mm"], XrayExposure(**truth["exposure"]),
                         dataclasses.replace(settings, extra_views=2), 0, 2)
    stored = pydicom.dcmread(demo_case_with_views / "views" / "view2.dcm").pixel_array
    np.testing.assert_array_equal(np.round(view["image"] * 65535).astype(np.uint16), stored)
    assert view["geometry"] == views["views"][1]["geometry"]

    # random: every view draws its own exposure and processing, as another site's radiograph would.
    case = tmp_path / "demo_000"
    make_case(case, "demo_000", 0, dataclasses.replace(settings, extra_views=2, views_protocol="random"))
    random_views = json.loads((case / "views" / "views.json").read_text())
    assert random_views["protocol"] == "random"
    for v in random_views["views"]:
        assert v["exposure"]["gamma"] != truth["exposure"]["gamma"]
        assert v["exposure"]["unsharp_amount"] != truth["exposure"]["unsharp_amount"]
    # The poses do not depend on the protocol.
    assert [v["geometry"] for v in random_views["views"]] == [v["geometry"] for v in views["views"]]
    with pytest.raises(BonedrrError, match="demo views_protocol must be one of same, random, not 'site'"):
        DemoSettings(views_protocol="site")


def test_a_cohort_of_few_sites_shares_their_protocols_and_keeps_its_patients_and_poses(demo_cases, tmp_path):
    import dataclasses

    import pydicom

    from bonedrr.demo.cohort import DemoSettings, make_case, site_exposure
    from bonedrr.errors import BonedrrError

    _, settings, own = demo_cases
    assert [t["site"] for t in own] == [None, None]  # sites: 0, every case its own protocol
    one_site = dataclasses.replace(settings, sites=1)
    truths = [make_case(tmp_path / f"demo_00{i}", f"demo_00{i}", i, one_site) for i in range(2)]
    protocol = ("kvp", "al_mm", "scatter_sigma_mm", "blur_px", "window_low_pct", "window_high_pct", "gamma",
                "unsharp_amount", "unsharp_sigma_mm")
    site = site_exposure(one_site, 0)
    for truth, before in zip(truths, own):
        assert truth["site"] == 0
        assert {k: truth["exposure"][k] for k in protocol} == {k: getattr(site, k) for k in protocol}
        assert truth["exposure"]["gamma"] != before["exposure"]["gamma"]
        # The patient, the pose and the DXA draw are the case's whatever the sites are.
        for key in ("patient", "geometry", "qct_vbmd_mg_cm3", "dxa_total_hip_abmd_g_cm2"):
            assert truth[key] == before[key], key
    # Each case its own dose and scatter, within the repeat's ranges of the protocol's.
    doses = [t["exposure"]["photons_per_pixel"] / site.photons_per_pixel for t in truths]
    assert doses[0] != doses[1] and all(10 ** -0.1 <= d <= 10 ** 0.1 for d in doses)
    assert float(pydicom.dcmread(tmp_path / "demo_000" / "xray.dcm").KVP) == site.kvp
    assert truths[1]["clinical"]["xray_kvp"] == site.kvp  # the PNG case's sample sheet knows the protocol's kVp
    # Two sites: cases alternate between them.
    assert site_exposure(dataclasses.replace(settings, sites=2), 1).gamma != site.gamma
    with pytest.raises(BonedrrError, match="demo sites must be 0 .every case its own protocol. or more, not -1"):
        DemoSettings(sites=-1)


def test_a_raw_cohort_stores_the_detectors_log_signal_on_one_scale(demo_cases, tmp_path):
    """``presentation: raw`` writes what the detector measured: -ln of the signal over the open beam at
    1000 stored units per decade above 1000, as a DICOM "for processing" image, with every draw (patient,
    pose, exposure, DXA) the processed cohort's."""
    import dataclasses

    import pydicom

    from bonedrr.demo.cohort import DemoSettings, draw_patient, make_case
    from bonedrr.demo.naming import case_files
    from bonedrr.demo.xray_physics import XrayExposure, detector_log_image
    from bonedrr.dicom import read_radiograph
    from bonedrr.errors import BonedrrError

    _, settings, processed = demo_cases
    raw = dataclasses.replace(settings, presentation="raw")
    truths = [make_case(tmp_path / f"demo_00{i}", f"demo_00{i}", i, raw) for i in range(2)]
    for truth, before in zip(truths, processed):
        assert truth["presentation"] == "raw"
        for key in ("patient", "geometry", "exposure", "qct_vbmd_mg_cm3", "dxa_total_hip_abmd_g_cm2"):
            assert truth[key] == before[key], key
    ds = pydicom.dcmread(tmp_path / "demo_000" / "xray.dcm")
    assert (ds.SOPClassUID, ds.PresentationIntentType, ds.PixelIntensityRelationship, ds.BitsStored) == (
        "1.2.840.10008.5.1.4.1.1.1.1.1", "FOR PROCESSING", "LOG", 16)
    # The stored values are the detector's log signal: against the case's noiseless one at its pose.
    truth = truths[0]
    patient, _, _ = draw_patient(0, raw)
    areal = project(patient.densities(), patient.grid, Geometry.from_dict(truth["geometry"]))
    exposure = XrayExposure(**{**truth["exposure"], "photons_per_pixel": 1e9})
    expected = 1000 + detector_log_image(areal, settings.pixel_mm, exposure, np.random.default_rng(0)) * 1000 / np.log(10)
    pixels = read_radiograph(tmp_path / "demo_000" / "xray.dcm").pixels
    assert np.corrcoef(pixels.ravel(), expected.ravel())[0, 1] > 0.99
    assert float(np.mean(pixels - expected)) == pytest.approx(0.0, abs=5.0)  # 5 units: 0.012 neper
    assert 1500 < np.percentile(pixels, 50) < 4500  # 1-8 nepers through a pelvis
    # 8 bits cannot hold a log scale: where the cohort would write a JPEG, a raw one writes a PNG.
    assert case_files(3, 2)["xray"] == "xray.jpg" and case_files(3, 2, "raw")["xray"] == "xray.png"
    with pytest.raises(BonedrrError, match="demo presentation must be one of processed, raw, not 'film'"):
        DemoSettings(presentation="film")
