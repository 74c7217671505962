"""The ``bonedrr`` command line: one sub-command per pipeline stage.

Each sub-command is a thin layer over a plain function of its stage module (usable from Python
without Snakemake). Errors caused by input or configuration print one line naming the file and the
problem and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bonedrr import __version__
from bonedrr.demo.naming import DEFAULTS as DEMO
from bonedrr.errors import BonedrrError

log = logging.getLogger("bonedrr")


def _demo_cohort(args) -> None:
    from tqdm import tqdm

    from bonedrr.demo.cohort import DemoSettings, make_case, write_samplesheet
    from bonedrr.demo.naming import case_id

    settings = DemoSettings(seed=args.seed, rows=args.rows, cols=args.cols, pixel_mm=tuple(args.pixel_mm),
                            sdd_mm=args.sdd_mm, nifti_png_every=args.nifti_png_every,
                            abmd_range=tuple(args.abmd_range), proximal_femur_cut_mm=args.cut_mm,
                            template=args.template)
    indices = args.cases if args.cases is not None else list(range(args.n))
    out = Path(args.out)
    if not args.samplesheet_only:
        for i in tqdm(indices, desc="virtual patients", unit="patient", disable=len(indices) < 2):
            truth = make_case(out / case_id(i), case_id(i), i, settings)
            log.info("%s: DXA aBMD left %.3f right %.3f g/cm2, scanner %s", case_id(i),
                     truth["dxa_total_hip_abmd_g_cm2"]["left"], truth["dxa_total_hip_abmd_g_cm2"]["right"],
                     truth["scanner"]["name"])
    if args.cases is None or args.samplesheet_only:
        dirs = [out / case_id(i) for i in range(args.n)]
        missing = [str(d) for d in dirs if not (d / "truth.json").is_file()]
        if missing:
            raise BonedrrError(f"demo case folders missing: {', '.join(missing)}", out)
        truths = [json.loads((d / "truth.json").read_text()) for d in dirs]
        write_samplesheet(out / "samples.tsv", truths, [str(d) for d in dirs])
        log.info("wrote %s (%d cases)", out / "samples.tsv", len(dirs))


def _ingest(args) -> None:
    from bonedrr.ingest import ingest_case

    clinical = {}
    if args.clinical_from:
        clinical = json.loads(Path(args.clinical_from).read_text()).get("clinical", {})
    for key in ("dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "scanner", "patient_id"):
        if getattr(args, key) is not None:
            clinical[key] = getattr(args, key)
    side = args.side or clinical.pop("side", None) or "both"
    clinical.pop("side", None)
    record = ingest_case(args.case_id, args.ct, args.xray, args.out, side=side, labels=args.labels,
                         pixel_mm=args.pixel_mm, sdd_mm=args.sdd_mm, clinical=clinical, cohort=args.cohort)
    x = record["xray"]
    log.info("%s: CT %s voxels of %s mm (%s); radiograph %dx%d, pixel %s mm (%s), SDD %.0f mm",
             args.case_id, "x".join(map(str, record["ct"]["size"])),
             "x".join(f"{v:.2f}" for v in record["ct"]["spacing_mm"]), record["ct"]["format"], x["rows"],
             x["cols"], "x".join(f"{v:.3f}" for v in x["pixel_mm"]), x["pixel_spacing_source"],
             record["geometry_prior"]["sdd_mm"])


def _ingest_labels(args) -> None:
    import SimpleITK as sitk

    from bonedrr.images import write_image
    from bonedrr.ingest import read_labels

    write_image(read_labels(args.labels, sitk.ReadImage(str(args.ct))), args.out)


def _calibrate(args) -> None:
    from bonedrr.calibrate import calibrate_case

    settings = {"method": args.method, "reference_ha_hu_per_mg_cm3": args.reference_ha,
                "internal_fat_hu": args.fat_hu, "internal_muscle_hu": args.muscle_hu,
                "phantom_background_mg_cm3": args.resin, "phantom_min_r2": args.min_r2}
    if args.rods:
        settings["phantom_rods_mg_cm3"] = args.rods
    if args.scanners:
        settings["scanners"] = json.loads(args.scanners)
    scanner = args.scanner
    if scanner is None and args.case:
        scanner = json.loads(Path(args.case).read_text()).get("clinical", {}).get("scanner")
    record = calibrate_case(args.ct, args.labels, args.out, settings, scanner=scanner, cut_mm=args.cut_mm)
    log.info("calibration (%s): HU = %.2f + %.4f x mg/cm3 HA; proximal femur vBMD %s mg/cm3", record["method"],
             record["intercept_hu"], record["slope_hu_per_mg_cm3"],
             {k: (round(v, 1) if v is not None else None) for k, v in record["qct_vbmd_mg_cm3"].items()})


def _drr(args) -> None:
    import SimpleITK as sitk

    from bonedrr.drr import contact_sheet, render_case, write_drr
    from bonedrr.geometry import Geometry

    try:
        geometry = Geometry.load(args.geometry)
    except (OSError, ValueError) as e:
        raise BonedrrError(str(e), args.geometry) from e
    channels = json.loads(args.channels) if args.channels else None
    result = render_case(args.density, args.labels, geometry, channels=channels, method=args.method,
                         step_mm=args.step_mm, device=args.device, cut_mm=args.cut_mm)
    write_drr(args.out, result)
    if args.png:
        radiograph = sitk.GetArrayFromImage(sitk.ReadImage(str(args.xray))) if args.xray else None
        contact_sheet(args.png, result, radiograph)
    log.info("DRR %dx%d, %d channels (%s, %s): bone max %.3f g/cm2", geometry.rows, geometry.cols,
             len(result["channels"]), result["method"], result["device"], float(result["drr"][0].max()))


def _register(args) -> None:
    from bonedrr.register import RegistrationSettings, register_case

    settings = RegistrationSettings(min_gc=args.min_gc, seed=args.seed, init_shift_mm=args.init_shift_mm)
    record = register_case(args.density, args.labels, args.xray, json.loads(Path(args.case).read_text()), args.out,
                           args.overlay, settings=settings, device=args.device, sod_prior_mm=args.sod_mm)
    log.info("registered: GC %.3f after %d DRRs, QA flags: %s", record["similarity_value"], record["evaluations"],
             ", ".join(record["qa_flags"]) or "none")
    if not record["converged"] and args.fail_on_qa:
        raise BonedrrError(f"registration failed its QA ({', '.join(record['qa_flags'])}); see {args.overlay}",
                           args.xray)


def _registration_summary(args) -> None:
    from bonedrr.register import registration_summary

    registration_summary(args.cases, args.out)


def _ingest_overview(args) -> None:
    from bonedrr.ingest import ingest_overview

    ingest_overview(args.cases, args.png, args.table)


def _train_segmenter(args) -> None:
    from bonedrr.segment import TrainSettings, train_segmenter

    if not len(args.case_ids) == len(args.ct) == len(args.labels):
        raise BonedrrError(f"--case-ids, --ct and --labels name {len(args.case_ids)}, {len(args.ct)} and "
                           f"{len(args.labels)} items; they must match one to one")
    settings = TrainSettings(trainer=args.trainer, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                             val_iterations_per_epoch=args.val_iterations_per_epoch, fold=args.fold,
                             configuration=args.configuration, sides=args.sides, device=args.device,
                             target_spacing_mm=args.target_spacing_mm, patch_size=args.patch_size,
                             batch_size=args.batch_size, base_features=args.base_features,
                             max_features=args.max_features, processes=args.processes, threads=args.threads)
    record = train_segmenter(list(zip(args.case_ids, args.ct, args.labels)), args.workdir, args.out, settings,
                             keep_workdir=args.keep_workdir)
    if args.progress_png:
        from bonedrr.segment import copy_progress_png

        copy_progress_png(args.out, record, args.progress_png)


def _segment(args) -> None:
    from bonedrr.segment import segment_case

    preset = json.loads(args.preset) if args.preset.lstrip().startswith("{") else args.preset
    side = args.side
    if side is None and args.case:
        side = json.loads(Path(args.case).read_text()).get("side", "both")
    volumes = json.loads(args.plausible_volume_cm3) if args.plausible_volume_cm3 else None
    segment_case(args.ct, args.model, args.out, preset=preset, fold=args.fold, device=args.device,
                 side=side or "both", reference=args.reference, plausible_volume_cm3=volumes, record_path=args.record,
                 overlay=args.overlay, use_reference_downstream=args.labels_downstream == "reference",
                 threads=args.threads, split=args.split)


def _segmentation_summary(args) -> None:
    from bonedrr.segment import segmentation_summary

    segmentation_summary(args.cases, args.out, args.png)


def _check_config(args) -> None:
    from bonedrr.config import cohort_cases, load_config

    config = load_config(args.config)
    cases = cohort_cases(config, args.base_dir)
    for cohort, rows in cases.items():
        print(f"{cohort}: {len(rows)} cases")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonedrr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bonedrr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-cohort", help="make virtual patients (CT + radiograph + truth) from the template CT")
    p.add_argument("--out", required=True, help="cohort folder; case folders and samples.tsv go here")
    p.add_argument("--n", type=int, default=8, help="number of patients (for the sample sheet)")
    p.add_argument("--cases", type=int, nargs="+", help="make only these case indices (no sample sheet)")
    p.add_argument("--samplesheet-only", action="store_true", help="only write samples.tsv for existing cases")
    p.add_argument("--seed", type=int, default=DEMO["seed"], help="cohort seed; case i draws from (seed, i)")
    p.add_argument("--rows", type=int, default=DEMO["rows"], help="radiograph rows")
    p.add_argument("--cols", type=int, default=DEMO["cols"], help="radiograph columns")
    p.add_argument("--pixel-mm", type=float, nargs=2, default=list(DEMO["pixel_mm"]), metavar=("ROW", "COL"),
                   help="detector pixel size, mm")
    p.add_argument("--sdd-mm", type=float, default=DEMO["sdd_mm"], help="nominal source-to-detector distance, mm")
    p.add_argument("--nifti-png-every", type=int, default=DEMO["nifti_png_every"],
                   help="every n-th case as NIfTI + PNG/JPEG (0: none)")
    p.add_argument("--abmd-range", type=float, nargs=2, default=list(DEMO["abmd_range"]), metavar=("LO", "HI"),
                   help="DXA total-hip aBMD range to draw from, g/cm2")
    p.add_argument("--cut-mm", type=float, default=80.0, help="proximal femur length below the head's top, mm")
    p.add_argument("--template", help="template folder (ct.nii.gz + TotalSegmentator labels.nii.gz)")
    p.set_defaults(func=_demo_cohort)

    p = sub.add_parser("ingest", help="check and convert one case's CT and radiograph")
    p.add_argument("--case-id", required=True)
    p.add_argument("--ct", required=True, help="DICOM folder or NIfTI/MHA/NRRD file")
    p.add_argument("--xray", required=True, help="DICOM DX/CR or PNG/JPEG")
    p.add_argument("--out", required=True, help="the case's results folder")
    p.add_argument("--labels", help="manual labels on the CT grid (canonical ids)")
    p.add_argument("--side", choices=["left", "right", "both"])
    p.add_argument("--pixel-mm", type=float, nargs=2, metavar=("ROW", "COL"),
                   help="default detector pixel for radiographs without spacing")
    p.add_argument("--sdd-mm", type=float, help="default source-to-detector distance")
    p.add_argument("--cohort", help="cohort name (recorded in case.json)")
    p.add_argument("--clinical-from", help="JSON file with a 'clinical' block (the demo's truth.json)")
    for key in ("dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right"):
        p.add_argument("--" + key.replace("_", "-"), type=float, dest=key)
    p.add_argument("--scanner")
    p.add_argument("--patient-id", dest="patient_id",
                   help="pseudonymous patient id shared by a patient's cases (default: the case id)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("ingest-labels", help="check manual labels against the ingested CT and copy them")
    p.add_argument("--labels", required=True, help="labels on the CT's grid (canonical ids)")
    p.add_argument("--ct", required=True, help="the ingested ct.nii.gz")
    p.add_argument("--out", required=True, help="labels.nii.gz to write")
    p.set_defaults(func=_ingest_labels)

    p = sub.add_parser("calibrate", help="HU to density (mg/cm3): phantom, per-scanner or internal calibration")
    p.add_argument("--ct", required=True, help="ct.nii.gz (HU)")
    p.add_argument("--labels", required=True, help="canonical labels on the CT's grid")
    p.add_argument("--out", required=True, help="folder for density.nii.gz, calibration.json, calibration.png")
    p.add_argument("--method", required=True, choices=["phantom", "scanner", "internal"])
    p.add_argument("--rods", type=float, nargs="+", help="phantom rod densities, mg/cm3 HA")
    p.add_argument("--resin", type=float, default=0.0, help="phantom resin density, mg/cm3 HA")
    p.add_argument("--min-r2", type=float, default=0.995, help="poorest acceptable phantom fit")
    p.add_argument("--scanner", help="this CT's scanner (method scanner; default: from --case)")
    p.add_argument("--case", help="the case's case.json (its sample-sheet scanner)")
    p.add_argument("--scanners", help='JSON {"name": {"slope": ..., "intercept": ...}} (method scanner)')
    p.add_argument("--fat-hu", type=float, default=-100.0, help="reference fat CT number (method internal)")
    p.add_argument("--muscle-hu", type=float, default=45.0, help="reference muscle CT number (method internal)")
    p.add_argument("--reference-ha", type=float, default=1.15, help="reference HU per mg/cm3 HA")
    p.add_argument("--cut-mm", type=float, default=80.0, help="proximal femur length below the head's top, mm")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("drr", help="per-structure DRRs (g/cm2) of a density volume at a geometry")
    p.add_argument("--density", required=True, help="density.nii.gz (mg/cm3)")
    p.add_argument("--labels", required=True, help="canonical labels on the same grid")
    p.add_argument("--geometry", required=True,
                   help="geometry.json, or any JSON with a 'geometry' object (pose.json, the demo's truth.json)")
    p.add_argument("--out", required=True, help="drr.h5 to write")
    p.add_argument("--png", help="contact sheet of the channels to write")
    p.add_argument("--xray", help="xray.nii.gz to show first in the contact sheet")
    p.add_argument("--method", choices=["siddon", "trilinear"], default="siddon")
    p.add_argument("--step-mm", type=float, help="trilinear sampling step (default: half the smallest voxel)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--channels", help='JSON {"channel": ["structure", ...]} (default: bonedrr.drr.DEFAULT_CHANNELS)')
    p.add_argument("--cut-mm", type=float, default=80.0, help="proximal femur length below the head's top, mm")
    p.set_defaults(func=_drr)

    p = sub.add_parser("register", help="2D/3D registration: the CT's pose in its radiograph's camera")
    p.add_argument("--density", required=True, help="density.nii.gz (mg/cm3)")
    p.add_argument("--labels", required=True, help="canonical labels on the same grid (bones are registered)")
    p.add_argument("--xray", required=True, help="xray.nii.gz (ingested radiograph)")
    p.add_argument("--case", required=True, help="case.json (the radiograph's geometry prior)")
    p.add_argument("--out", required=True, help="pose.json to write (detector geometry, pose, similarity, QA)")
    p.add_argument("--overlay", help="overlay.png to write (DRR edges on the radiograph, checkerboard)")
    p.add_argument("--sod-mm", type=float, help="source-to-patient prior where the radiograph has no tag")
    p.add_argument("--min-gc", type=float, default=0.35, help="lowest acceptable gradient correlation")
    p.add_argument("--init-shift-mm", type=float, default=60.0, help="half-width of the initial shift search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--fail-on-qa", action="store_true", help="exit with an error when a QA flag is raised")
    p.set_defaults(func=_register)

    p = sub.add_parser("registration-summary", help="a cohort's registrations in one table (and errors vs truth)")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with pose.json)")
    p.add_argument("--out", required=True, help="TSV to write")
    p.set_defaults(func=_registration_summary)

    p = sub.add_parser("ingest-overview", help="a cohort's ingested cases: a table and a contact sheet")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with case.json)")
    p.add_argument("--png", required=True, help="contact sheet to write")
    p.add_argument("--table", required=True, help="TSV to write")
    p.set_defaults(func=_ingest_overview)

    p = sub.add_parser("train-segmenter", help="train an nnU-Net v2 model on labelled CTs (plan, preprocess, train)")
    p.add_argument("--case-ids", nargs="+", required=True, help="training case ids")
    p.add_argument("--ct", nargs="+", required=True, help="their ct.nii.gz, in the same order")
    p.add_argument("--labels", nargs="+", required=True, help="their canonical labels on the CT grids, same order")
    p.add_argument("--workdir", required=True, help="folder for nnU-Net's raw/preprocessed/results and temp files")
    p.add_argument("--out", required=True, help="the trained model folder to write")
    p.add_argument("--progress-png", help="copy of nnU-Net's training curves to write")
    p.add_argument("--trainer", default="nnUNetTrainerNoMirroring",
                   help="nnU-Net trainer class name (nnU-Net's, or bonedrr's nnUNetTrainerBonedrr)")
    p.add_argument("--epochs", type=int, help="epochs (default: the trainer's, 1000)")
    p.add_argument("--iterations-per-epoch", type=int, help="training iterations per epoch (default: 250)")
    p.add_argument("--val-iterations-per-epoch", type=int, help="validation iterations per epoch (default: 50)")
    p.add_argument("--fold", default="all", choices=["all", "0", "1", "2", "3", "4"],
                   help="'all' (every labelled case trains) or a fold of nnU-Net's 5-fold split")
    p.add_argument("--configuration", default="3d_fullres", choices=["3d_fullres", "2d"], help="nnU-Net configuration")
    p.add_argument("--sides", choices=["model", "midline"], default="model",
                   help="model: learn left/right labels; midline: learn side-less ones, split at the body's midline")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--target-spacing-mm", type=float, help="isotropic working voxel size (default: nnU-Net's)")
    p.add_argument("--patch-size", type=int, nargs="+", help="training patch in voxels (default: nnU-Net's)")
    p.add_argument("--batch-size", type=int, help="patches per iteration (default: nnU-Net's)")
    p.add_argument("--base-features", type=int, help="features of the first U-Net stage (default: 32)")
    p.add_argument("--max-features", type=int, help="most features of a stage (default: 320 in 3D, 512 in 2D)")
    p.add_argument("--processes", type=int, default=1, help="preprocessing and data-augmentation processes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--keep-workdir", action="store_true", help="keep nnU-Net's raw and preprocessed data")
    p.set_defaults(func=_train_segmenter)

    p = sub.add_parser("segment", help="segment one CT with an nnU-Net v2 model into canonical labels")
    p.add_argument("--ct", required=True, help="ct.nii.gz (HU)")
    p.add_argument("--model", required=True, help="nnU-Net v2 trained model folder (with plans.json, fold_X/)")
    p.add_argument("--out", required=True, help="labels.nii.gz to write (canonical ids)")
    p.add_argument("--record", help="segmentation.json to write (volumes, plausibility, Dice, timing)")
    p.add_argument("--overlay", help="segmentation.png to write (coronal and axial slices with contours)")
    p.add_argument("--preset", default="canonical",
                   help='label preset (canonical, totalsegmentator_v2) or JSON {"model id": "canonical name"}')
    p.add_argument("--fold", default="all", help="the model's fold to use")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--case", help="case.json (its side is checked for a femur)")
    p.add_argument("--side", choices=["left", "right", "both"], help="measured side (default: from --case)")
    p.add_argument("--reference", help="reference labels (canonical ids, CT grid) for Dice and surface distance")
    p.add_argument("--labels-downstream", choices=["predicted", "reference"], default="predicted",
                   help="write the reference instead of the prediction where there is one")
    p.add_argument("--plausible-volume-cm3", help='JSON {"femur": [lo, hi], "hip": [lo, hi]}')
    p.add_argument("--split", choices=["train", "test"], help="whether the case trained the model (recorded)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=_segment)

    p = sub.add_parser("segmentation-summary", help="a cohort's segmentations: Dice table and picture")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with segmentation.json)")
    p.add_argument("--out", required=True, help="TSV to write")
    p.add_argument("--png", required=True, help="Dice picture to write")
    p.set_defaults(func=_segmentation_summary)

    p = sub.add_parser("check-config", help="validate a config and its sample sheets")
    p.add_argument("config")
    p.add_argument("--base-dir", default=".", help="folder that relative sample-sheet paths start from")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        args.func(args)
    except BonedrrError as e:
        if args.debug:
            raise
        print(f"bonedrr {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
