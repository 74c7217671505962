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
from bonedrr.bmd import BMD_THRESHOLD_G_CM2
from bonedrr.demo.naming import DEFAULTS as DEMO
from bonedrr.errors import BonedrrError, InputError

log = logging.getLogger("bonedrr")


def _demo_cohort(args) -> None:
    from tqdm import tqdm

    from bonedrr.demo.cohort import DemoSettings, make_case, write_samplesheet
    from bonedrr.demo.naming import case_id

    settings = DemoSettings(seed=args.seed, rows=args.rows, cols=args.cols, pixel_mm=tuple(args.pixel_mm),
                            sdd_mm=args.sdd_mm, nifti_png_every=args.nifti_png_every,
                            abmd_range=tuple(args.abmd_range), proximal_femur_cut_mm=args.cut_mm,
                            template=args.template, extra_views=args.extra_views,
                            views_protocol=args.views_protocol, sites=args.sites, presentation=args.presentation)
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
    for key in ("dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "scanner", "patient_id",
                "xray_kvp"):
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

    from bonedrr.drr import contact_sheet, render_case, structure_poses, write_drr
    from bonedrr.geometry import Geometry

    try:
        geometry = Geometry.load(args.geometry)
        femur_poses = structure_poses(json.loads(Path(args.geometry).read_text()))
    except (OSError, ValueError) as e:
        raise BonedrrError(str(e), args.geometry) from e
    channels = json.loads(args.channels) if args.channels else None
    result = render_case(args.density, args.labels, geometry, channels=channels, method=args.method,
                         step_mm=args.step_mm, device=args.device, cut_mm=args.cut_mm, femur_poses=femur_poses)
    write_drr(args.out, result)
    if args.png:
        radiograph = sitk.GetArrayFromImage(sitk.ReadImage(str(args.xray))) if args.xray else None
        contact_sheet(args.png, result, radiograph)
    log.info("DRR %dx%d, %d channels (%s, %s): bone max %.3f g/cm2", geometry.rows, geometry.cols,
             len(result["channels"]), result["method"], result["device"], float(result["drr"][0].max()))


def _register(args) -> None:
    from bonedrr.register import RegistrationSettings, register_case

    settings = RegistrationSettings(min_gc=args.min_gc, seed=args.seed, init_shift_mm=args.init_shift_mm,
                                    per_structure=args.per_structure, fine_method=args.fine_method,
                                    max_restart_spread_mm=args.max_restart_spread_mm)
    record = register_case(args.density, args.labels, args.xray, json.loads(Path(args.case).read_text()), args.out,
                           args.overlay, settings=settings, device=args.device, sod_prior_mm=args.sod_mm,
                           sdd_tolerance=args.sdd_tolerance)
    log.info("registered: GC %.3f after %d DRRs, QA flags: %s", record["similarity_value"], record["evaluations"],
             ", ".join(record["qa_flags"]) or "none")
    if not record["converged"] and args.fail_on_qa:
        raise BonedrrError(f"registration failed its QA ({', '.join(record['qa_flags'])}); see {args.overlay}",
                           args.xray)


def _registration_summary(args) -> None:
    from bonedrr.register import registration_summary

    registration_summary(args.cases, args.out, args.png)


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
                             max_features=args.max_features,
                             processes=args.processes or max(1, (args.threads or 1) - 1), threads=args.threads,
                             seed=args.seed)
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

def _bmd(args) -> None:
    from bonedrr.bmd import bmd_case

    record = bmd_case(args.density, args.labels, args.drr, args.case, args.out, calibration_json=args.calibration,
                      threshold_g_cm2=args.threshold, cut_mm=args.cut_mm)
    for side, s in record["sides"].items():
        log.info("%s hip: DRR-BMD %s g/cm2, QCT vBMD %s mg/cm3, DXA aBMD %s g/cm2", side,
                 *(("-" if s[k] is None else f"{s[k]:.{d}f}") for k, d in
                   (("drr_bmd_g_cm2", 3), ("qct_vbmd_mg_cm3", 1), ("dxa_abmd_g_cm2", 3))))


def _bmd_summary(args) -> None:
    from bonedrr.bmd import bmd_summary

    bmd_summary(args.cases, args.out)


def _pack(args) -> None:
    from bonedrr.shards import PackSettings, pack_cohort

    settings = PackSettings(crop_mm=tuple(args.crop_mm), crop_px=tuple(args.crop_px),
                            head_position=tuple(args.head_position), folds=args.folds, seed=args.seed,
                            shard_size_mb=args.shard_size_mb, compression=args.compression,
                            threshold_g_cm2=args.threshold)
    manifest = pack_cohort(args.cases, args.out, settings, cohort=args.cohort)
    log.info("%s: %d samples in %d shard(s), %d excluded (see excluded.tsv)", args.out, manifest["n_samples"],
             len(manifest["shards"]), manifest["n_excluded"])


def _validate(args) -> None:
    from bonedrr.validate import ValidationSettings, validate_cohort

    settings = ValidationSettings(threshold_g_cm2=args.threshold, jpeg_qualities=tuple(args.jpeg_qualities),
                                  jpeg_ratios=tuple(args.jpeg_ratios),
                                  examples=args.examples, device=args.device)
    result = validate_cohort(args.shards, args.models, args.out, cases_root=args.cases_root,
                             demo_root=args.demo_root, default_pixel_mm=args.pixel_mm, settings=settings,
                             cohort=args.cohort, qc_dir=args.qc_dir)
    for key, m in result["model"].items():
        b = result["baseline"].get(key, {})
        log.info("%s (n %d): r %.3f (baseline %.3f), ICC(2,1) %.3f, MAE %.4g %s", m["label"], m["n"], m["pearson_r"],
                 b.get("pearson_r", float("nan")), m["icc_2_1"], m["mae"], m["unit"])
    if result.get("pose"):
        log.info("multi-pose RMS-CV %.2f %% (true hip centres %.2f %%)",
                 100 * result["pose"]["bmd_located_hips"]["rms_cv"], 100 * result["pose"]["bmd_true_hips"]["rms_cv"])


def _train(args) -> None:
    import torch

    from bonedrr.train import train_model

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.loads(args.settings) if args.settings else {}
    if args.seed is not None:
        settings["seed"] = args.seed
    folds, exclude, val = args.folds, None, args.val_folds
    if args.hold_out is not None:
        exclude, val = [args.hold_out], (val if val is not None else [args.hold_out])
    model = train_model(args.shards, args.out, settings, folds=folds, exclude_folds=exclude, val_folds=val,
                        device=args.device, stop_after_epochs=args.stop_after_epochs)
    if model is None:
        log.info("stopped early; run the same command again to resume from %s/checkpoint.pt", args.out)
    else:
        log.info("model: %s (channels %s, trained on %d samples)", args.out, ", ".join(model.channels),
                 model.info["n_train"])


def _estimate(args) -> None:
    from bonedrr.estimate import describe, estimate_many

    many = len(args.xray) > 1
    out_dirs = [None if args.out is None else Path(args.out) / (Path(x).name.split(".")[0] if many else "")
                for x in args.xray]
    if many and len({d for d in out_dirs if d is not None}) < len(args.xray) and args.out is not None:
        raise BonedrrError("--xray: two radiographs share a file name (their --out folders would collide)")
    results = estimate_many(args.model, args.xray, side=args.side, out_dirs=out_dirs, pixel_mm=args.pixel_mm,
                            crop=args.crop, t_reference=args.t_reference, device=args.device, threads=args.threads,
                            kvp=args.kvp)
    if args.json:
        print(json.dumps([{"xray": Path(x).name, **r} for x, r in zip(args.xray, results)] if many else results[0],
                         indent=2))
    else:
        print("\n".join((f"{Path(x).name}:\n" + describe(r)) if many else describe(r)
                        for x, r in zip(args.xray, results)))


def _check_config(args) -> None:
    from bonedrr.config import cohort_cases, load_config

    config = load_config(args.config)
    cases = cohort_cases(config, args.base_dir)
    for cohort, rows in cases.items():
        print(f"{cohort}: {len(rows)} cases")


def _accept_staged(args) -> None:
    from bonedrr.outcome import accept_staged

    accept_staged(args.staged, args.out, args.names)


def _case_outcome(args) -> None:
    from bonedrr.images import write_json
    from bonedrr.outcome import case_outcome

    record = case_outcome(args.case_id, args.ingest_status, args.pose, args.segment_status)
    write_json(args.out, record)
    log.info("%s: %s", args.case_id, "ok" if record["ok"] else f"failed at {record['stage']}: {record['reason']}")


def _failures(args) -> None:
    from bonedrr.outcome import failures_table

    failed = failures_table(args.outcomes, args.out)
    log.info("%d of %d cases failed", len(failed), len(args.outcomes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonedrr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bonedrr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--status", metavar="JSON",
                        help="record the outcome in this file; an input error (the case's data) is then "
                             "recorded (and logged) and the exit status is 0, so a workflow can go on without "
                             "the case")
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
    p.add_argument("--extra-views", type=int, default=0,
                   help="extra radiographs of each patient at other poses, in views/ (multi-pose repeatability)")
    p.add_argument("--views-protocol", choices=["same", "random"], default="same",
                   help="the extra views repeat the case's kVp, filtration and processing (same; another dose, "
                        "scatter and noise) or draw their own (random)")
    p.add_argument("--sites", type=int, default=DEMO["sites"],
                   help="acquisition protocols (devices and their processing) the radiographs come from: 0, every "
                        "case its own; N, case i on protocol i mod N (1: a single hospital)")
    p.add_argument("--presentation", choices=["processed", "raw"], default=DEMO["presentation"],
                   help="radiographs as a DX workstation presents them (processed) or the detector's log signal on "
                        "one scale, DICOM 'FOR PROCESSING' (raw)")
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
    p.add_argument("--xray-kvp", type=float, dest="xray_kvp",
                   help="the radiograph's tube voltage (kV) where its file does not record it (DICOM KVP wins)")
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
                   help="geometry.json, or any JSON with a 'geometry' object (pose.json, the demo's truth.json); "
                        "a pose.json of a per-structure registration also places each femur at its own pose")
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
    p.add_argument("--sdd-tolerance", type=float, default=0.1,
                   help="relative uncertainty of an SDD from the cohort's prior (reported as a depth uncertainty)")
    p.add_argument("--min-gc", type=float, default=0.35, help="lowest acceptable gradient correlation")
    p.add_argument("--max-restart-spread-mm", type=float, default=1.0,
                   help="largest acceptable mPD between the finest level's restarts (else QA flag unstable)")
    p.add_argument("--init-shift-mm", type=float, default=60.0, help="half-width of the initial shift search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--fail-on-qa", action="store_true", help="exit with an error when a QA flag is raised")
    p.add_argument("--per-structure", action="store_true",
                   help="then register the pelvis and each femur as rigid bodies of their own")
    p.add_argument("--fine-method", choices=["trilinear", "siddon"], default="trilinear",
                   help="ray integration of the finest level (the coarser ones use siddon)")
    p.set_defaults(func=_register)

    p = sub.add_parser("registration-summary", help="a cohort's registrations in one table (and errors vs truth)")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with pose.json)")
    p.add_argument("--out", required=True, help="TSV to write")
    p.add_argument("--png", help="picture to write: per-case errors (or similarity) with QA flags")
    p.set_defaults(func=_registration_summary)

    p = sub.add_parser("ingest-overview", help="a cohort's ingested cases: a table and a contact sheet")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with case.json)")
    p.add_argument("--png", required=True, help="contact sheet to write")
    p.add_argument("--table", required=True, help="TSV to write")
    p.set_defaults(func=_ingest_overview)

    p = sub.add_parser("accept-staged", help="move a checked stage's files from staging into the case folder")
    p.add_argument("--staged", required=True, help="the staging folder")
    p.add_argument("--out", required=True, help="the case folder")
    p.add_argument("names", nargs="+", help="file names to move")
    p.set_defaults(func=_accept_staged)

    p = sub.add_parser("case-outcome", help="whether a case reached the training data, or where and why it failed")
    p.add_argument("--case-id", required=True)
    p.add_argument("--ingest-status", required=True, help="status/ingest.json")
    p.add_argument("--segment-status", help="status/segment.json")
    p.add_argument("--pose", help="pose.json (registration QA)")
    p.add_argument("--out", required=True, help="outcome.json to write")
    p.set_defaults(func=_case_outcome)

    p = sub.add_parser("failures", help="a cohort's failed cases and their reasons, one TSV")
    p.add_argument("--outcomes", nargs="+", required=True, help="outcome.json of every case")
    p.add_argument("--out", required=True, help="failures.tsv to write")
    p.set_defaults(func=_failures)

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
    p.add_argument("--processes", type=int, help="preprocessing and data-augmentation processes (default: one "
                   "fewer than --threads, at least 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, help="seed: a rerun trains the same model (default: nnU-Net's, unseeded)")
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

    p = sub.add_parser("bmd", help="BMD targets of a case per hip: DRR-BMD, QCT vBMD, DXA aBMD (bmd.json)")
    p.add_argument("--density", required=True, help="density.nii.gz (mg/cm3)")
    p.add_argument("--labels", required=True, help="canonical labels on the same grid")
    p.add_argument("--drr", required=True, help="drr.h5 (with proximal_femur_left/right channels)")
    p.add_argument("--case", required=True, help="case.json (side, clinical DXA values)")
    p.add_argument("--calibration", help="calibration.json (its QCT vBMD; else the density's mean)")
    p.add_argument("--out", required=True, help="bmd.json to write")
    p.add_argument("--threshold", type=float, default=BMD_THRESHOLD_G_CM2,
                   help="projected-bone threshold of DRR-BMD, g/cm2")
    p.add_argument("--cut-mm", type=float, default=80.0, help="proximal femur length below the head's top, mm")
    p.set_defaults(func=_bmd)

    p = sub.add_parser("bmd-summary", help="a cohort's BMD targets in one table (and the demo's truth)")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with bmd.json)")
    p.add_argument("--out", required=True, help="TSV to write")
    p.set_defaults(func=_bmd_summary)

    p = sub.add_parser("pack", help="pack a cohort's cases into HDF5 training shards (docs/shards.md)")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders")
    p.add_argument("--out", required=True, help="shard folder to write (replaced atomically)")
    p.add_argument("--cohort", help="cohort name (recorded in the shards)")
    p.add_argument("--crop-mm", type=float, nargs=2, default=[240.0, 120.0], metavar=("H", "W"),
                   help="crop size at the detector, mm")
    p.add_argument("--crop-px", type=int, nargs=2, default=[128, 64], metavar=("ROWS", "COLS"),
                   help="stored crop size (rows = 2 x cols)")
    p.add_argument("--head-position", type=float, nargs=2, default=[0.3, 0.7], metavar=("ROW", "COL"),
                   help="femoral head centre in the crop, fractions of height and width (right-hip orientation)")
    p.add_argument("--folds", type=int, default=5, help="number of cross-validation folds")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--shard-size-mb", type=float, default=1000.0, help="uncompressed size of one shard, MB")
    p.add_argument("--compression", default="lzf", choices=["none", "lzf", "gzip-1", "gzip-4", "gzip-9"])
    p.add_argument("--threshold", type=float, default=BMD_THRESHOLD_G_CM2,
                   help="projected-bone threshold of DRR-BMD and the masks, g/cm2")
    p.set_defaults(func=_pack)

    p = sub.add_parser("validate", help="BMD of held-out radiographs per fold model: metrics, sweeps, baseline, report")
    p.add_argument("--shards", required=True, help="the cohort's shard folder")
    p.add_argument("--models", nargs="+", required=True, help="model folders named <cohort>_fold<k> (k held out)")
    p.add_argument("--out", required=True, help="folder for predictions.csv, metrics.json, plots/, report.html")
    p.add_argument("--cohort", help="cohort name (shown in the report)")
    p.add_argument("--cases-root", help="the cohort's results folder (whole radiographs for the JPEG sweep)")
    p.add_argument("--demo-root", help="a demo cohort's demo_input folder (extra views: the multi-pose sweep)")
    p.add_argument("--qc-dir", help="the cohort's qc folder: its segmentation, registration and failures tables "
                   "are summarised in the report")
    p.add_argument("--pixel-mm", type=float, nargs=2, default=list(DEMO["pixel_mm"]), metavar=("ROW", "COL"),
                   help="detector pixel of radiographs without spacing (the cohort's xray.pixel_mm)")
    p.add_argument("--jpeg-qualities", type=int, nargs="*", default=[95, 75, 50, 30, 20, 10, 5, 3, 1],
                   help="JPEG qualities of the compression sweep (none: only the --jpeg-ratios points)")
    p.add_argument("--jpeg-ratios", type=float, nargs="*", default=[50.0],
                   help="compression ratios of the sweep, each radiograph at the highest quality reaching one "
                        "(none: no such point; the JPEG target is checked at 50)")
    p.add_argument("--examples", type=int, default=4, help="example decompositions in the report")
    p.add_argument("--threshold", type=float, default=BMD_THRESHOLD_G_CM2, help="DRR-BMD threshold, g/cm2")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_validate)

    p = sub.add_parser("train", help="train the decomposition model (and hip locator) on a cohort's shards")
    p.add_argument("--shards", required=True, help="the cohort's shard folder (results/<cohort>/shards)")
    p.add_argument("--out", required=True, help="model folder to write (results/models/<name>); resumes from "
                   "its checkpoint.pt")
    p.add_argument("--settings", help="JSON of the config's train: block (default: bonedrr.train.TrainSettings)")
    p.add_argument("--folds", type=int, nargs="+", help="train on these folds only (default: all)")
    p.add_argument("--hold-out", type=int, help="train on every fold but this one (and show it in the curves)")
    p.add_argument("--val-folds", type=int, nargs="+", help="folds whose losses the curves show (never trained on)")
    p.add_argument("--seed", type=int, help="overrides the settings' seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="CPU threads of torch")
    p.add_argument("--stop-after-epochs", type=int, help="stop after this many epochs, keeping the checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("estimate", help="BMD from one radiograph (DICOM, PNG, JPEG) with a trained model")
    p.add_argument("--model", required=True, help="trained model folder (results/models/<name>)")
    p.add_argument("--xray", required=True, nargs="+", help="radiograph(s): a full AP pelvis (DICOM DX/CR, PNG, JPEG) or a hip "
                   "crop (--crop)")
    p.add_argument("--side", choices=["left", "right", "both"], default="both")
    p.add_argument("--crop", action="store_true", help="the image is a hip crop (one side), not a full radiograph")
    p.add_argument("--pixel-mm", type=float, nargs=2, metavar=("ROW", "COL"),
                   help="detector pixel size, mm, for files without spacing tags (PNG/JPEG)")
    p.add_argument("--kvp", type=float, metavar="KV",
                   help="tube voltage of a radiograph that does not record it (PNG/JPEG, DICOM without KVP); a model "
                   "trained with network condition kvp needs it (a DICOM's own KVP wins)")
    p.add_argument("--t-reference", type=float, nargs=2, metavar=("MEAN", "SD"),
                   help="young-adult reference aBMD mean and SD (g/cm2): adds a T-score")
    p.add_argument("--out", help="folder for estimate.json and the decomposed images (default: none written; several "
                   "radiographs: a subfolder per file name)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cpu runs the model's torch-free copy (model.npz) where it has one; auto and cuda use torch")
    p.add_argument("--threads", type=int, help="CPU threads of the torch model (the torch-free one's BLAS follows "
                   "OMP_NUM_THREADS)")
    p.set_defaults(func=_estimate)

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
        if args.status and isinstance(e, InputError):  # the case's fault; a config error stops the run
            from bonedrr.outcome import write_status

            write_status(args.status, args.command, e)
            return 0
        return 2
    if args.status:
        from bonedrr.outcome import write_status

        write_status(args.status, args.command, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
