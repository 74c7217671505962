"""Pictures and the self-contained HTML report of the ``validate`` stage (:mod:`bonedrr.validate`).

Plots (PNG, also registered in the Snakemake report): scatter plots with identity lines and
Bland-Altman plots per ground truth, model beside baseline; example decompositions (radiograph crop,
true and predicted proximal-femur DRR, difference); the JPEG sweep and the multi-pose repeatability as
curves. ``report.html`` embeds them as base64 PNG beside the metric tables: one file, no external
reference, nothing identifying (sample ids are the pipeline's pseudonymous case ids).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from bonedrr.images import atomic_path

_TRUTH_ORDER = ("qct_vbmd", "drr_bmd", "dxa_abmd")
#: The plot files, always written (a placeholder says why one is empty).
PLOTS = ("scatter", "bland_altman", "examples", "jpeg", "pose")
_LABELS = {"drr_bmd": ("DRR-BMD", "g/cm2"), "qct_vbmd": ("QCT vBMD", "mg/cm3"), "dxa_abmd": ("DXA aBMD", "g/cm2")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    _plt().close(fig)
    return path


def _col(rows, key):
    return np.array([r.get(key, math.nan) for r in rows], float)


def _truths(rows) -> list[str]:
    return [k for k in _TRUTH_ORDER if np.isfinite(_col(rows, f"true_{k}")).sum() >= 3]


def write_plots(folder: Path, rows: list[dict], jpeg: list[dict], pose: list[dict], examples: list[dict],
                result: dict) -> dict[str, Path]:
    """Write every plot; returns ``{name: path}`` (names: scatter, bland_altman, examples, jpeg, pose)."""
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}
    truths = _truths(rows)
    if truths:
        for kind in ("scatter", "bland_altman"):
            fig, axes = plt.subplots(2, len(truths), figsize=(4.2 * len(truths), 7.6), squeeze=False)
            for j, key in enumerate(truths):
                label, unit = _LABELS[key]
                truth = _col(rows, f"true_{key}")
                for i, who in enumerate(("model", "baseline")):
                    pred = _col(rows, f"{'pred' if who == 'model' else 'baseline'}_{key}")
                    ax = axes[i, j]
                    m = result[who].get(key, {})
                    name = "decomposition" if who == "model" else "baseline (ROI intensity)"
                    ok = np.isfinite(pred) & np.isfinite(truth)
                    if kind == "scatter":
                        ax.scatter(truth[ok], pred[ok], s=14, c="C0" if who == "model" else "C1")
                        lo = float(np.nanmin(np.r_[truth[ok], pred[ok]])) if ok.any() else 0
                        hi = float(np.nanmax(np.r_[truth[ok], pred[ok]])) if ok.any() else 1
                        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
                        ax.set_xlabel(f"true {label} ({unit})")
                        ax.set_ylabel(f"predicted ({unit})")
                        ax.legend(loc="upper left", fontsize=8)
                    else:
                        mean, diff = (pred[ok] + truth[ok]) / 2, pred[ok] - truth[ok]
                        ax.scatter(mean, diff, s=14, c="C0" if who == "model" else "C1")
                        for v, style in ((m.get("bias"), "-"), (m.get("loa_low"), "--"), (m.get("loa_high"), "--")):
                            if v is not None and np.isfinite(v):
                                ax.axhline(v, color="k", ls=style, lw=1)
                        ax.set_xlabel(f"mean of predicted and true {label} ({unit})")
                        ax.set_ylabel(f"predicted - true ({unit})")
                    if m:
                        ax.set_title(f"{name}: r {m['pearson_r']:.3f}, ICC {m['icc_2_1']:.3f}", fontsize=9)
            fig.tight_layout()
            plots[kind] = _save(fig, folder / f"{kind}.png")
    if examples:
        fig, axes = plt.subplots(len(examples), 4, figsize=(8.0, 3.3 * len(examples)), squeeze=False)
        for i, ex in enumerate(examples):
            vmax = float(max(ex["true"].max(), ex["pred"].max(), 1e-6))
            diff = ex["pred"] - ex["true"]
            dmax = float(max(np.abs(diff).max(), 1e-6))
            # windowed on the pixels inside the radiograph: a crop past its edge is padded with the minimum,
            # which would otherwise squeeze a raw log image's anatomy into the top of the grey scale
            inside = ex["xray"][ex["xray"] > ex["xray"].min()]
            lo_x, hi_x = np.percentile(inside, (1, 99)) if inside.size else (None, None)
            panels = [(ex["xray"], "radiograph crop", "gray", lo_x, hi_x),
                      (ex["true"], f"true DRR\nBMD {ex['true_bmd']:.3f}", "magma", 0, vmax),
                      (ex["pred"], f"predicted DRR\nBMD {ex['pred_bmd']:.3f}", "magma", 0, vmax),
                      (diff, "predicted - true\n(g/cm2)", "coolwarm", -dmax, dmax)]
            for ax, (img, title, cmap, lo, hi) in zip(axes[i], panels):
                shown = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
                # the id on its own line: beside "radiograph crop" it ran past the narrow panel's left edge
                ax.set_title(f"{ex['sample_id']}\n{title}" if ax is axes[i][0] else title, fontsize=8)
                ax.axis("off")
                if cmap != "gray":
                    fig.colorbar(shown, ax=ax, fraction=0.08)
        fig.tight_layout()
        plots["examples"] = _save(fig, folder / "examples.png")
    if result.get("jpeg"):
        # fixed qualities as a curve; each target ratio (every radiograph compressed to it) as a star
        fixed = [e for e in result["jpeg"] if e.get("target_ratio") is None]
        targeted = [e for e in result["jpeg"] if e.get("target_ratio") is not None]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key in _truths(rows):
            a.plot([e["ratio_raw8"] for e in fixed], [e[key]["pearson_r"] for e in fixed], "o-", label=_LABELS[key][0])
            colour = a.lines[-1].get_color()
            a.plot([e["ratio_raw8"] for e in targeted], [e[key]["pearson_r"] for e in targeted], "*", ms=11,
                   color=colour)
            m = result["model"].get(key)
            if m:
                a.axhline(m["pearson_r"], ls=":", lw=1, color=colour)
        a.axvline(50, color="k", lw=1, ls="--", label="1/50")
        if targeted:
            a.plot([], [], "k*", ms=9, ls="none", label="each radiograph at " + ", ".join(
                f"1/{e['target_ratio']:g}" for e in targeted))
        a.set_xscale("log")
        a.set_xlabel("compression ratio (8-bit size / JPEG size)")
        a.set_ylabel("Pearson r (dotted: uncompressed)")
        a.legend(fontsize=8)
        b.plot([e["ratio_raw8"] for e in fixed], [e["mean_abs_change_g_cm2"] for e in fixed], "o-")
        b.plot([e["ratio_raw8"] for e in targeted], [e["mean_abs_change_g_cm2"] for e in targeted], "*", ms=11,
               color=b.lines[-1].get_color())
        for e in result["jpeg"]:  # a target ratio's label below its point, clear of the fixed qualities' above
            below = e.get("target_ratio") is not None
            b.annotate(_jpeg_point(e), (e["ratio_raw8"], e["mean_abs_change_g_cm2"]), fontsize=7,
                       textcoords="offset points", xytext=(4, -10 if below else 3))
        b.axvline(50, color="k", lw=1, ls="--")
        b.set_xscale("log")
        b.set_xlabel("compression ratio")
        b.set_ylabel("mean |BMD change| vs uncompressed (g/cm2)")
        fig.tight_layout()
        plots["jpeg"] = _save(fig, folder / "jpeg.png")
    if pose:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        hips = sorted({(r["patient_id"], r["side"]) for r in pose})
        for n, hip in enumerate(hips):
            rs = sorted((r for r in pose if (r["patient_id"], r["side"]) == hip), key=lambda r: r["radiograph"])
            a.plot([r["radiograph"] for r in rs], [r["bmd_located_hips"] for r in rs], "o-", lw=1, ms=3,
                   color=f"C{n % 10}")
        a.set_xlabel("radiograph of the hip (0: the case's, 1..: extra views)")
        a.set_ylabel("predicted DRR-BMD (g/cm2), hips located")
        cvs = []
        for hip in hips:
            v = np.array([r["bmd_located_hips"] for r in pose if (r["patient_id"], r["side"]) == hip], float)
            v = v[np.isfinite(v)]
            cvs.append(100 * v.std(ddof=1) / v.mean() if v.size > 1 else math.nan)
        b.bar(range(len(hips)), cvs)
        summary = result.get("pose") or {}
        rms = summary.get("bmd_located_hips", {}).get("rms_cv", math.nan)
        b.axhline(100 * rms, color="k", ls="--", lw=1, label=f"RMS-CV {100 * rms:.2f} %")
        floor = (summary.get("true_drr_bmd") or {}).get("rms_cv")
        if floor is not None and math.isfinite(floor):
            b.axhline(100 * floor, color="C2", ls="-.", lw=1, label=f"the truth's own {100 * floor:.2f} %")
        b.axhline(3.0, color="r", ls=":", lw=1, label="target 3 %")
        if len(hips) <= 40:  # a validation cohort's hundreds of names would be one black smear
            b.set_xticks(range(len(hips)), [f"{p}\n{s[0].upper()}" for p, s in hips], fontsize=6, rotation=90)
        else:
            b.set_xticks([])
            b.set_xlabel(f"{len(hips)} hips (names in pose.csv)")
        a.set_xticks(sorted({r["radiograph"] for r in pose}))
        b.set_ylabel("CV of BMD over radiographs (%)")
        b.legend(fontsize=8)
        fig.tight_layout()
        plots["pose"] = _save(fig, folder / "pose.png")
    reasons = {"scatter": "fewer than 3 held-out hips with a ground truth", "examples": "no held-out hip",
               "jpeg": "no JPEG sweep (validate.jpeg_qualities and jpeg_ratios empty, or no whole radiographs given)",
               "pose": "no multi-pose sweep (a demo cohort with extra_views makes one)"}
    reasons["bland_altman"] = reasons["scatter"]
    for name in PLOTS:
        if name not in plots:  # every plot file exists (the workflow declares them): say why it is empty
            fig, ax = plt.subplots(figsize=(6, 1.2))
            ax.text(0.5, 0.5, f"not measured: {reasons[name]}", ha="center", va="center", fontsize=9)
            ax.axis("off")
            _save(fig, folder / f"{name}.png")
    return plots


# ---------------------------------------------------------------------------------------------
# HTML


def _jpeg_point(entry: dict) -> str:
    """A JPEG sweep point's label: ``q20`` (a fixed quality) or ``1/50 (q8-14)`` (a target ratio)."""
    if entry.get("target_ratio") is None:
        return f"q{entry['quality']}"
    lo, hi = entry["qualities"]
    return f"1/{entry['target_ratio']:g} (q{lo}" + (f"-{hi})" if hi != lo else ")")


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pipeline_section(pipeline: dict | None) -> list[str]:
    """Segmentation Dice, each case's registration errors and QA, and the failed cases."""
    if not pipeline:
        return []
    parts = ["<h2>Upstream quality: segmentation, registration, failed cases</h2>"]
    seg = pipeline.get("segmentation") or {}
    rows = [[html.escape({"test": "held out", "train": "trained on"}.get(split, split)), html.escape(name),
             _fmt(v["n"]), _fmt(v["mean_dice"]), _fmt(v["min_dice"])]
            for split in sorted(seg, key=lambda k: k != "test") for name, v in seg[split].items()]
    if rows:
        parts += ["<h3>Segmentation (nnU-Net) against the reference labels</h3>",
                  _table(["cases", "structure", "n", "mean Dice", "lowest Dice"], rows),
                  "<p class=note>Per case: results/&lt;cohort&gt;/qc/segmentation.tsv and each case's "
                  "segmentation.png.</p>"]
    reg = pipeline.get("registration") or []
    if reg:
        parts += ["<h3>Registration of each case</h3>",
                  _table(["case", "GC", "mPD (mm)", "rotation error (deg)", "mTRE (mm)", "depth error (mm)", "QA flags"],
                         [[html.escape(r["case_id"]), _fmt(r["gc"]), _fmt(r["mpd_mm"]), _fmt(r["rotation_error_deg"]),
                           _fmt(r["mtre_mm"]), _fmt(r["depth_error_mm"]),
                           html.escape(", ".join(r["qa_flags"]) or "none")] for r in reg]),
                  "<p class=note>Errors against the true pose (truth.json; blank where no truth is known) over the "
                  "bone voxels: mPD, the mean reprojection distance at the isocentre; mTRE in 3D, of which "
                  "one view pins down the depth part least. Each case's overlay.png shows the fit.</p>"]
    failures = pipeline.get("failures") or []
    parts += ["<h3>Failed cases</h3>",
              _table(["case", "stage", "reason"], [[html.escape(f.get("case_id", "")), html.escape(f.get("stage", "")),
                                                    html.escape(f.get("reason", ""))] for f in failures])
              if failures else "<p>None.</p>"]
    return parts


def write_report(path: Path, result: dict, plots: dict[str, Path]) -> None:
    """The self-contained HTML report (images embedded)."""
    d = result["definitions"]
    parts = [f"<h1>BMD validation: {html.escape(str(result.get('cohort') or ''))}</h1>",
             f"<p>{result['n_samples']} held-out hips, folds {', '.join(map(str, result['folds']))}; each hip "
             "predicted by the model of the fold that held its patient out (patient-disjoint cross-validation).</p>"]
    rows = []
    volumetric = result.get("qct_readout") == "drr_vbmd"
    names = {"model": "decomposition", "baseline": "baseline", "ceiling": "true DRR-BMD (ceiling)"}
    for key in _TRUTH_ORDER:
        entries = [(names[who], result.get(who, {}).get(key)) for who in ("model", "baseline", "ceiling")]
        if key == "qct_vbmd" and volumetric:  # read from DRR-vBMD; the areal line beside it
            areal = result.get("qct_from_drr_bmd", {})
            entries = [("decomposition, DRR-vBMD", entries[0][1]), ("decomposition, DRR-BMD line", areal.get("model")),
                       entries[1], ("true DRR-vBMD (ceiling)", entries[2][1]),
                       ("true DRR-BMD line (ceiling)", areal.get("ceiling"))]
        for name, m in entries:
            if not m or not m.get("n"):
                continue
            label, unit = _LABELS[key]
            rows.append([f"{label} ({unit})", name,
                         _fmt(m["n"]), _fmt(m["pearson_r"]), _fmt(m["icc_2_1"]), _fmt(m["icc_3_1"]),
                         _fmt(m["mae"], 4), _fmt(m["rmse"], 4), _fmt(m["bias"], 4),
                         f"{_fmt(m['loa_low'], 4)} .. {_fmt(m['loa_high'], 4)}"])
    parts += ["<h2>Agreement with each ground truth</h2>",
              _table(["truth", "method", "n", "Pearson r", "ICC(2,1)", "ICC(3,1)", "MAE", "RMSE", "bias",
                      "95% limits of agreement"], rows),
              f"<p class=note>ICC: {html.escape(d['icc'])}. Bland-Altman: {html.escape(d['bland_altman'])}. "
              f"Calibration: {html.escape(d['calibration'])}. Ceiling: {html.escape(d['ceiling'])}. "
              + (f"QCT vBMD is read from DRR-vBMD: {html.escape(d['drr_vbmd'])}. " if volumetric else "") +
              "Baseline: BMD regressed linearly on the mean radiograph intensity in the proximal femur's projected "
              "area (the true mask), fitted on the training folds.</p>"]
    for name, title in (("scatter", "Predicted against true (identity dashed); top: decomposition, bottom: baseline"),
                        ("bland_altman", "Bland-Altman (bias solid, 95 % limits dashed)")):
        if name in plots:
            parts += [f"<h3>{title}</h3>", _img(plots[name], name)]
    targets = result.get("targets", {})
    if targets:
        parts += ["<h2>Targets (issue 7)</h2>",
                  _table(["target", "requirement", "value", "met"],
                         [[html.escape(k), html.escape(v["target"]), _fmt(v["value"], 4), _fmt(v["met"])]
                          for k, v in targets.items()])]
    ost = result.get("osteoporosis") or {}
    if ost:
        parts += ["<h2>Osteoporosis (T-score &le; -2.5) against DXA</h2>",
                  _table(["method", "n", "osteoporotic (DXA)", "AUC", "sensitivity", "specificity"],
                         [["decomposition" if w == "model" else "baseline", _fmt(c["n"]), _fmt(c["n_positive"]),
                           _fmt(c["auc"]), _fmt(c["sensitivity"]), _fmt(c["specificity"])] for w, c in ost.items()]),
                  f"<p class=note>T-scores: {html.escape(d['t_score'])}.</p>"]
    dec = result.get("decomposition") or {}
    if dec:
        parts += ["<h2>Decomposition quality (held-out)</h2>",
                  _table(["channel", "n", "PSNR (dB)", "SSIM"],
                         [[html.escape(c), _fmt(v["n"]), _fmt(v["psnr_db"], 2), _fmt(v["ssim"])]
                          for c, v in dec.items()]),
                  f"<p class=note>{html.escape(d['psnr_ssim'])}.</p>"]
    if "examples" in plots:
        parts += ["<h3>Example decompositions (proximal femur)</h3>", _img(plots["examples"], "examples")]
    if result.get("jpeg"):
        parts += ["<h2>JPEG compression</h2>",
                  _table(["JPEG", "ratio (8-bit)", "ratio (PNG)", "r QCT", "r DRR-BMD", "mean |change| g/cm2"],
                         [[html.escape(_jpeg_point(e)), _fmt(e["ratio_raw8"], 1), _fmt(e["ratio_png"], 1),
                           _fmt(e["qct_vbmd"]["pearson_r"]), _fmt(e["drr_bmd"]["pearson_r"]),
                           _fmt(e["mean_abs_change_g_cm2"], 4)] for e in result["jpeg"]]),
                  f"<p class=note>Ratio: {html.escape(d['jpeg_ratio'])}. q: a fixed Pillow quality; 1/N: each "
                  "radiograph at the highest quality compressing it N times or more (the qualities it took).</p>"]
        if "jpeg" in plots:
            parts.append(_img(plots["jpeg"], "jpeg"))
    pose = result.get("pose")
    if pose:
        located, true, error = pose["bmd_located_hips"], pose["bmd_true_hips"], pose["locator_error_mm"]
        parts += ["<h2>Multi-pose repeatability</h2>",
                  _table(["BMD", "RMS-CV", "hips", "radiographs"],
                         [[name, f"{_fmt(100 * (r['rms_cv'] if r['rms_cv'] is not None else math.nan), 2)} %",
                           _fmt(r["n_subjects"]), _fmt(r["n_measurements"])]
                          for name, r in (("predicted, hips located by the model (as bonedrr estimate)", located),
                                          ("predicted, hips at the projected true head centres", true),
                                          ("true DRR-BMD at each radiograph's pose (the truth's own change)",
                                           pose.get("true_drr_bmd")))
                          if r is not None]),
                  f"<p class=note>{html.escape(d['rms_cv'])}. Locator error: median {_fmt(error['median'], 1)} mm, "
                  f"max {_fmt(error['max'], 1)} mm. The paper reports 3.27-3.79 %.</p>"]
        if "pose" in plots:
            parts.append(_img(plots["pose"], "pose"))
    parts += _pipeline_section(result.get("pipeline"))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "img{max-width:100%}.note{font-size:85%;color:#555}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>bonedrr validation</title><style>{style}</style>"
           f"</head><body>{''.join(parts)}</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(doc)
