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
    for key in ("dxa_abmd_left", "dxa_abmd_right", "qct_vbmd_left", "qct_vbmd_right", "scanner"):
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


def _ingest_overview(args) -> None:
    from bonedrr.ingest import ingest_overview

    ingest_overview(args.cases, args.png, args.table)


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
    p.set_defaults(func=_ingest)

    p = sub.add_parser("ingest-overview", help="a cohort's ingested cases: a table and a contact sheet")
    p.add_argument("--cases", nargs="+", required=True, help="case results folders (with case.json)")
    p.add_argument("--png", required=True, help="contact sheet to write")
    p.add_argument("--table", required=True, help="TSV to write")
    p.set_defaults(func=_ingest_overview)

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
