"""The ``demo-cohort`` stage: one virtual patient's files, written as users have theirs.

Each case folder holds

* ``ct/`` (a DICOM CT series) or ``ct.nii.gz`` (every ``nifti_png_every``-th case);
* ``xray.dcm`` (DICOM DX with ImagerPixelSpacing and distance tags; bit depth and MONOCHROME1/2 vary)
  or ``xray.png`` / ``xray.jpg`` (no spacing: the cohort's ``xray`` defaults apply);
* ``labels.nii.gz``: the true canonical labels (a lab's manual segmentation of this patient);
* ``truth.json``: true pose and geometry, QCT vBMD and DXA aBMD of each proximal femur, and every
  random draw; its ``clinical`` block is what a clinic's sample sheet would hold;
* ``preview.png``: the CT (coronal) beside its radiograph;
* ``views/`` (only with ``extra_views`` > 0): more radiographs of the same patient at other poses
  (``view1.dcm``, ...; same CT, same simulator), and ``views.json`` with each view's true geometry and
  exposure. By default (``views_protocol: same``) they are repeat radiographs on the case's device and
  exam protocol: its kVp, filtration and processing, another dose, scatter and noise; with ``random``
  each view draws all of these anew, as another hospital's radiograph would. They are for the multi-pose repeatability sweep of the validation stage; the
  pipeline's training never sees them. Their DICOM headers carry no patient data.

Every case's radiograph has its own kVp, filtration and processing unless ``sites`` gives the cohort
that many acquisition protocols (:func:`site_exposure`; 1: one hospital's cohort).

DICOM files carry a made-up patient name, id, birth date and institution, so that de-identification
downstream has real work to do. The folder is written under a temporary name and renamed when
complete.

Example (about 10 s):
    >>> from bonedrr.demo.cohort import DemoSettings, make_case
    >>> make_case("/tmp/demo_case", "demo_000", 0, DemoSettings(rows=64, cols=80))  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from bonedrr import __version__
from bonedrr.dicom import write_ct_series, write_radiograph_dicom
from bonedrr.demo import virtual_patient as vp
from bonedrr.demo.naming import DEFAULTS, case_files, case_id  # noqa: F401 (re-exported)
from bonedrr.demo.projector import project
from bonedrr.demo.xray_physics import PRESENTATIONS, XrayExposure, simulate_radiograph
from bonedrr.geometry import Geometry, ap_pose
from bonedrr.images import atomic_path, image_like, index_to_world, write_image, write_json
from bonedrr.labels import CANONICAL_LABELS, SIDES

DXA_PRECISION_CV = 0.01  # a DXA scanner's short-term precision (coefficient of variation)
_GIVEN = ["Josephine", "Arturo", "Ingrid", "Kwame", "Mei", "Dmitri", "Aroha", "Fatima", "Lucien", "Svea"]
_FAMILY = ["Moreau", "Quispe", "Lindqvist", "Mensah", "Takahashi", "Volkov", "Ngata", "Haddad", "Brun", "Ek"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo config sets (``cohorts.<name>.demo`` and ``cohorts.<name>.xray``).

    Args:
        seed: Cohort seed; case ``i`` draws from ``(seed, i)``, so cases are independent of N.
        rows, cols: Detector size of the simulated radiographs.
        pixel_mm: Detector pixel [row, col] (also the cohort's default for PNG/JPEG cases).
        sdd_mm: Nominal source-to-detector distance (DICOM cases vary around it; PNG/JPEG use it).
        nifti_png_every: Every n-th case (index n-1, 2n-1, ...) is written as NIfTI + PNG/JPEG.
        abmd_range: DXA total-hip aBMD range (g/cm2) the patients are drawn from.
        proximal_femur_cut_mm: Length of the proximal femur region (see ``labels.proximal_femur_mask``).
        template: Folder with the template CT and labels (None: the vendored one).
        extra_views: Extra radiographs of each patient at other poses (``views/``; 0: none). They are
            drawn from their own random stream, so the case's other files and truth do not change.
        views_protocol: ``same``: the extra views repeat the case's exposure protocol
            (:meth:`XrayExposure.repeat`: same kVp, filtration and processing; another dose, scatter
            and noise), as repeat radiographs of a patient on one device are taken; ``random``: each
            view draws its own exposure and processing (:meth:`XrayExposure.random`), as if from
            another site.
        sites: How many acquisition protocols (devices with their exam protocol and workstation
            processing) the cohort's radiographs come from. 0: every case draws its own, as if each
            patient came from another site (the hardest setting, the default); N >= 1: N protocols
            (:func:`site_exposure`), case ``i`` on protocol ``i mod N``, each case another dose,
            scatter and noise (:meth:`XrayExposure.repeat`). 1 is a single hospital's cohort, as
            the paper's was. The cases' poses, anatomy and other draws are the same for every value.
        presentation: ``processed`` (the default): radiographs as a DX workstation presents them
            (windowed on their own percentiles, tone curve, unsharp masking; DICOM "FOR
            PRESENTATION"); ``raw``: the detector's log signal on one fixed scale (DICOM "FOR
            PROCESSING", pixel intensity relationship LOG, 16 bits; PNG where a case would be JPEG;
            :func:`bonedrr.demo.xray_physics.simulate_radiograph`). Every draw is the same for both.
    """

    seed: int = DEFAULTS["seed"]
    rows: int = DEFAULTS["rows"]
    cols: int = DEFAULTS["cols"]
    pixel_mm: tuple[float, float] = DEFAULTS["pixel_mm"]
    sdd_mm: float = DEFAULTS["sdd_mm"]
    nifti_png_every: int = DEFAULTS["nifti_png_every"]
    abmd_range: tuple[float, float] = DEFAULTS["abmd_range"]
    proximal_femur_cut_mm: float = 80.0
    template: str | None = DEFAULTS["template"]
    extra_views: int = 0
    views_protocol: str = "same"
    sites: int = 0
    presentation: str = "processed"

    def __post_init__(self):
        from bonedrr.errors import BonedrrError

        if self.views_protocol not in VIEWS_PROTOCOLS:
            raise BonedrrError(f"demo views_protocol must be one of {', '.join(VIEWS_PROTOCOLS)}, "
                               f"not {self.views_protocol!r}")
        if self.sites < 0:
            raise BonedrrError(f"demo sites must be 0 (every case its own protocol) or more, not {self.sites}")
        if self.presentation not in PRESENTATIONS:
            raise BonedrrError(f"demo presentation must be one of {', '.join(PRESENTATIONS)}, not {self.presentation!r}")


#: How the extra views' exposures relate to the case's (DemoSettings.views_protocol).
VIEWS_PROTOCOLS = ("same", "random")

_TEMPLATES: dict = {}


def _template(settings: DemoSettings) -> tuple[vp.Materials, dict[str, float], float]:
    """The template's materials, its aBMD per side at factor 1 and its trabecular share (cached)."""
    key = (settings.template, settings.proximal_femur_cut_mm)
    if key not in _TEMPLATES:
        t, cut = vp.load_template(settings.template), settings.proximal_femur_cut_mm
        _TEMPLATES[key] = (t, {s: vp.dxa_abmd(t, s, cut) for s in SIDES}, vp.trabecular_share(t, cut))
    return _TEMPLATES[key]


def draw_patient(index: int, settings: DemoSettings) -> tuple[vp.Materials, vp.PatientParams, np.random.Generator]:
    """Virtual patient ``index`` of a cohort: its materials, its drawn parameters, and its random stream
    after those draws (:func:`make_case` draws the case's acquisition from it). The same patient every
    time, so an experiment can re-simulate a case's radiograph without its files."""
    rng = np.random.default_rng([settings.seed, index])
    template, template_abmd, share = _template(settings)
    params = vp.draw_params(rng, template_abmd, settings.abmd_range, trabecular_share=share,
                            proximal_femur_cut_mm=settings.proximal_femur_cut_mm)
    return vp.make_patient(template, params), params, rng


def site_exposure(settings: DemoSettings, site: int) -> XrayExposure:
    """Acquisition protocol ``site`` (0, 1, ...) of a cohort with ``settings.sites`` >= 1: a kVp,
    filtration, detector and processing drawn as a case's own are (:meth:`XrayExposure.random`), from the
    stream ``(seed, site, 2)``, so a cohort's protocols do not depend on its number of patients.

    Example:
        >>> a = site_exposure(DemoSettings(sites=2), 0)
        >>> a == site_exposure(DemoSettings(sites=3), 0), a == site_exposure(DemoSettings(sites=2), 1)
        (True, False)
    """
    return XrayExposure.random(np.random.default_rng([settings.seed, site, 2]))


def case_radiograph(settings: DemoSettings, index: int, areal: dict[str, np.ndarray], pixel_mm,
                    rng: np.random.Generator) -> tuple[np.ndarray, XrayExposure, int | None]:
    """Case ``index``'s radiograph from its areal densities: the image, its exposure and its protocol's
    number (None: its own).

    With ``settings.sites`` 0 the exposure and the noise are drawn from the case's stream ``rng``.
    Otherwise the site's protocol is repeated (another dose and scatter) and the noise drawn from the
    stream ``(seed, index, 3)``; the case's own radiograph is still simulated and dropped, because its
    Poisson noise takes a varying number of draws from ``rng``, and the case's later draws (DXA, the
    CT's noise) must not depend on ``sites``.
    """
    own = XrayExposure.random(rng)
    image = simulate_radiograph(areal, pixel_mm, own, rng, settings.presentation)
    if settings.sites == 0:
        return image, own, None
    site = index % settings.sites
    site_rng = np.random.default_rng([settings.seed, index, 3])
    exposure = site_exposure(settings, site).repeat(site_rng)
    return simulate_radiograph(areal, pixel_mm, exposure, site_rng, settings.presentation), exposure, site


def make_case(out_dir: str | Path, case: str, index: int, settings: DemoSettings) -> dict:
    """Make one virtual patient and write its folder. Returns its truth (as in truth.json)."""
    out_dir = Path(out_dir)
    patient, params, rng = draw_patient(index, settings)
    files = case_files(index, settings.nifti_png_every, settings.presentation)
    raster = files["xray"] != "xray.dcm"

    # Radiograph geometry and pose.
    sdd = settings.sdd_mm if raster else float(round(settings.sdd_mm + rng.uniform(-50, 50)))
    sod = sdd - float(rng.uniform(180, 230))
    geometry = Geometry.centered(sdd, settings.rows, settings.cols, settings.pixel_mm)
    centre = _view_centre(patient, geometry, sod)
    pose = ap_pose(centre, sod, params.pose_rotvec_deg, params.pose_shift_mm)
    geometry = geometry.with_pose(pose)
    areal = project(patient.densities(), patient.grid, geometry)
    image, exposure, site = case_radiograph(settings, index, areal, geometry.pixel_mm, rng)

    truth = {
        "case_id": case, "generator": f"bonedrr {__version__} demo-cohort", "seed": settings.seed,
        "index": index, "geometry": geometry.to_dict(), "source_to_centre_mm": sod,
        "view_centre_world_mm": centre,
        "qct_vbmd_mg_cm3": {s: vp.qct_vbmd(patient, s, settings.proximal_femur_cut_mm) for s in SIDES},
        "dxa_abmd_noiseless_g_cm2": {s: vp.dxa_abmd(patient, s, settings.proximal_femur_cut_mm) for s in SIDES},
        "proximal_femur_cut_mm": settings.proximal_femur_cut_mm,
        "bone_mineral_mass_g": vp.bone_mineral_mass_g(patient),
        "scanner": {
            "name": params.scanner, "hu_slope": params.scanner_slope, "hu_intercept": params.scanner_intercept,
            "nominal": vp.SCANNERS[params.scanner], "ha_hu_per_mg_cm3_ideal": vp.HA_HU_PER_MG,
            "phantom_rods_mg_cm3": list(vp.PHANTOM_RODS_MG_CM3),
            "note": "scanner HU = hu_intercept + hu_slope * (soft-tissue HU + ha_hu_per_mg_cm3_ideal * mg/cm3 HA)",
        },
        "patient": params.to_dict(), "exposure": asdict(exposure), "site": site, "presentation": settings.presentation, "files": files,
    }
    dxa = {s: v * (1 + rng.normal(0, DXA_PRECISION_CV)) for s, v in truth["dxa_abmd_noiseless_g_cm2"].items()}
    truth["dxa_total_hip_abmd_g_cm2"] = dxa
    truth["clinical"] = {"side": "both", "dxa_abmd_left": round(dxa["left"], 4),
                         "dxa_abmd_right": round(dxa["right"], 4), "scanner": params.scanner}
    if raster:  # a PNG keeps no header: the sheet gives the tube voltage, as a clinic knows its protocol's
        truth["clinical"]["xray_kvp"] = exposure.kvp

    phi = _made_up_patient(rng)
    hu = vp.scanned_hu(patient, params, rng)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=_mkdir(out_dir.parent)))
    try:
        ct_image = image_like(hu, patient.grid)
        if raster:
            write_image(sitk.Cast(sitk.Round(ct_image), sitk.sitkInt16), tmp / files["ct"])
            _write_raster(tmp / files["xray"], image)
        else:
            write_ct_series(tmp / files["ct"], ct_image, phi, key=f"{settings.seed}/{case}")
            bits = (12, 16, 12, 8)[index % 4] if settings.presentation == "processed" else 16
            stored = np.round(image * (2 ** bits - 1)).astype(np.uint16)
            photometric = "MONOCHROME1" if index % 3 == 1 else "MONOCHROME2"
            if photometric == "MONOCHROME1":
                stored = (2 ** bits - 1) - stored
            write_radiograph_dicom(tmp / files["xray"], stored, geometry.pixel_mm, sdd, sod, phi,
                                   key=f"{settings.seed}/{case}", bits_stored=bits, photometric=photometric,
                                   kvp=exposure.kvp, raw=settings.presentation == "raw")
            truth["xray_encoding"] = {"bits_stored": bits, "photometric": photometric}
        write_image(image_like(patient.labels, patient.grid), tmp / files["labels"])
        write_json(tmp / "truth.json", truth)
        _preview(tmp / "preview.png", hu, patient, image, case)
        if settings.extra_views > 0:
            _write_views(tmp / "views", patient, centre, exposure, settings, index, case)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return truth


#: How far an extra view's pose strays from an AP view centred on the hips: rotation (degrees, about
#: each camera axis) and shift (mm), drawn uniformly within +-.
VIEW_ROTATION_DEG, VIEW_SHIFT_MM = 5.0, 10.0


def simulate_view(patient: vp.Materials, centre: list[float], exposure: XrayExposure, settings: DemoSettings,
                  index: int, k: int) -> dict:
    """Extra radiograph ``k`` (1, 2, ...) of patient ``index``, drawn from the random stream ``(seed,
    index, 1, k)`` as the case's ``views/view<k>.dcm`` is (the same image): its own pose and source
    distances, and the case's ``exposure`` repeated or a new one (``settings.views_protocol``).

    Args:
        patient: The virtual patient (:func:`draw_patient`).
        centre: The case's view centre (world mm, ``truth.json``'s ``view_centre_world_mm``).
        exposure: The case's own radiograph's exposure (``truth.json``'s ``exposure``).
        settings: The cohort's settings (seed, detector, ``views_protocol``).
        index, k: The patient's index and the view's number.

    Returns:
        ``{"image"}`` (0..1, bone bright), and ``geometry``, ``source_to_centre_mm``,
        ``pose_rotvec_deg``, ``pose_shift_mm``, ``exposure`` as ``views.json`` records them.
    """
    rng = np.random.default_rng([settings.seed, index, 1, k])
    sdd = float(round(settings.sdd_mm + rng.uniform(-50, 50)))
    sod = sdd - float(rng.uniform(180, 230))
    rotation = [float(v) for v in rng.uniform(-VIEW_ROTATION_DEG, VIEW_ROTATION_DEG, 3)]
    shift = [float(v) for v in rng.uniform(-VIEW_SHIFT_MM, VIEW_SHIFT_MM, 3)]
    geometry = Geometry.centered(sdd, settings.rows, settings.cols, settings.pixel_mm)
    geometry = geometry.with_pose(ap_pose(centre, sod, rotation, shift))
    view_exposure = exposure.repeat(rng) if settings.views_protocol == "same" else XrayExposure.random(rng)
    image = simulate_radiograph(project(patient.densities(), patient.grid, geometry), geometry.pixel_mm,
                                view_exposure, rng, settings.presentation)
    return {"image": image, "geometry": geometry.to_dict(), "source_to_centre_mm": sod,
            "pose_rotvec_deg": rotation, "pose_shift_mm": shift, "exposure": asdict(view_exposure)}


def _write_views(folder: Path, patient: vp.Materials, centre: list[float], exposure: XrayExposure,
                 settings: DemoSettings, index: int, case: str) -> None:
    """The case's extra radiographs (:func:`simulate_view`) as 16-bit DICOM DX with spacing and
    distance tags and no patient data, and their ``views.json``."""
    folder.mkdir()
    views = []
    for k in range(1, settings.extra_views + 1):
        view = simulate_view(patient, centre, exposure, settings, index, k)
        image = view.pop("image")
        name = f"view{k}.dcm"
        write_radiograph_dicom(folder / name, np.round(image * 65535).astype(np.uint16), settings.pixel_mm,
                               view["geometry"]["sdd_mm"], view["source_to_centre_mm"],
                               {"PatientIdentityRemoved": "YES", "StudyDate": ""},
                               key=f"{settings.seed}/{case}/view{k}", bits_stored=16, kvp=view["exposure"]["kvp"],
                               raw=settings.presentation == "raw")
        views.append({"file": name, **view})
    write_json(folder / "views.json", {"case_id": case, "view_centre_world_mm": centre,
                                       "protocol": settings.views_protocol, "views": views})


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _view_centre(patient: vp.Materials, geometry: Geometry, sod: float) -> list[float]:
    """Central-ray point: between the femurs in x and depth; in z, 40 mm below the femoral heads' top
    unless that would let the lowest rows (cone divergence, pose) look past the end of the scan."""
    femurs = np.isin(patient.labels, [CANONICAL_LABELS["femur_left"], CANONICAL_LABELS["femur_right"]])
    kji = np.argwhere(femurs)
    ijk = kji[:, ::-1].astype(float)
    world = ijk @ index_to_world(patient.grid)[:3, :3].T + index_to_world(patient.grid)[:3, 3]
    z_bottom = index_to_world(patient.grid)[2, 3]  # identity direction: slice 0 is the lowest
    half_height = geometry.rows * geometry.pixel_mm[0] / 2 * sod / geometry.sdd_mm
    z = max(float(world[:, 2].max()) - 40.0, z_bottom + half_height + 40.0)
    return [float(world[:, 0].mean()), float(world[:, 1].mean()), z]


def _write_raster(path: Path, image: np.ndarray) -> None:
    if path.suffix == ".jpg":
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path, quality=85)
    else:
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)


def _made_up_patient(rng: np.random.Generator) -> dict:
    year = int(rng.integers(1935, 1975))
    return {
        "PatientName": f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
        "PatientID": f"MRN{rng.integers(10**6, 10**7)}",
        "PatientBirthDate": f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "PatientSex": str(rng.choice(["F", "M"])),
        "InstitutionName": "Saint Example Hospital",
        "ReferringPhysicianName": f"{rng.choice(_FAMILY)}^Dr",
        "AccessionNumber": f"ACC{rng.integers(10**5, 10**6)}",
        "StudyDate": f"20{int(rng.integers(18, 26))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
    }


def _preview(path: Path, hu: np.ndarray, patient: vp.Materials, image: np.ndarray, case: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    femurs = np.isin(patient.labels, [CANONICAL_LABELS["femur_left"], CANONICAL_LABELS["femur_right"]])
    j = int(np.argwhere(femurs)[:, 1].mean()) if femurs.any() else hu.shape[1] // 2
    sx, _, sz = patient.grid.GetSpacing()
    coronal = hu[::-1, j, :]  # superior up; identity LPS grid: patient's right on the left (radiological view)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    axes[0].imshow(coronal, cmap="gray", vmin=-200, vmax=1300, aspect=sz / sx)
    axes[0].set_title(f"{case}: CT, coronal (HU -200..1300)")
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("simulated AP radiograph")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_samplesheet(path: str | Path, truths: list[dict], case_dirs: list[str]) -> None:
    """The demo cohort's sample sheet, as a user would write theirs (paths relative to the sheet)."""
    path = Path(path)
    lines = ["case_id\tct\txray\tside\tlabels\tdxa_abmd_left\tdxa_abmd_right\tscanner\txray_kvp"]
    for truth, case_dir in zip(truths, case_dirs):
        rel = Path(case_dir).resolve().relative_to(path.parent.resolve())
        c, f = truth["clinical"], truth["files"]
        lines.append("\t".join([truth["case_id"], str(rel / f["ct"]), str(rel / f["xray"]), c["side"],
                                str(rel / f["labels"]), str(c["dxa_abmd_left"]), str(c["dxa_abmd_right"]),
                                c["scanner"], str(c.get("xray_kvp", ""))]))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
