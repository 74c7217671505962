"""Segmentation inference per CT on CPU: the demo's CTs and the real CT, with the demo's trained model.

Run after the demo (it needs results/demo/segmenter/model and the ingested CTs):

    PYTHONPATH=src python benchmarks/segment.py [--results results/demo] [--cases 4]

Each CT is segmented by ``bonedrr.segment.segment_case`` in a process of its own (its peak resident
memory is that one CT's), and all of them once more in a single process one after the other (its peak
must stay that of one CT: nothing accumulates). Side by side, the same CTs through nnU-Net's own
file-to-file predictor (``nnUNetPredictor.predict_from_files_sequential``, what ``nnUNetv2_predict``
runs), as the peer. Dice of the demo model on its held-out cases comes from the demo's
``qc/segmentation.tsv``. Writes benchmarks/results/segment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO / "resources" / "totalseg_example" / "ct.nii.gz"
REAL_LABELS = REPO / "resources" / "totalseg_example" / "labels.nii.gz"

_ONE = r"""
import json, resource, sys, time
from bonedrr.segment import segment_case
model, out, threads, cts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rows = []
for i, ct in enumerate(cts):
    r = segment_case(ct, model, f"{out}/labels_{i}.nii.gz", device="cpu", threads=threads,
                     plausible_volume_cm3={"femur": [0, 1e9], "hip": [0, 1e9]}, side="both")
    rows.append({"ct": ct, "inference_s": r["seconds"]["inference"], "load_model_s": r["seconds"]["load_model"]})
print(json.dumps({"rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_PEER = r"""
import json, os, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from bonedrr.segment import load_predictor, nnunet_environment
with nnunet_environment(sys.argv[2] + "/work"):
    p = load_predictor(sys.argv[1], "all", "cpu")  # nnU-Net's predictor, bonedrr's trainer lookup
    times = []
    for i, ct in enumerate(sys.argv[4:]):
        os.makedirs(sys.argv[2] + f"/peer_{i}", exist_ok=True)
        t = time.perf_counter()
        p.predict_from_files_sequential([[ct]], sys.argv[2] + f"/peer_{i}", save_probabilities=False,
                                        overwrite=True)
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "results" / "demo"))
    parser.add_argument("--cases", type=int, default=4, help="demo CTs to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="a remark stored with the results (which model, the load)")
    args = parser.parse_args()
    results = Path(args.results)
    model = results / "segmenter" / "model"
    training = json.loads((model / "training.json").read_text())
    demo_cts = sorted(str(p) for p in results.glob("demo_*/ct.nii.gz"))[-args.cases:]  # held-out cases
    import SimpleITK as sitk

    sizes = {ct: sitk.ReadImage(ct).GetSize() for ct in demo_cts + [str(REAL_CT)]}
    with tempfile.TemporaryDirectory() as tmp:
        per_ct = {ct: _run(_ONE, [str(model), tmp, str(args.threads), ct]) for ct in demo_cts + [str(REAL_CT)]}
        together = _run(_ONE, [str(model), tmp, str(args.threads), *demo_cts]) if len(demo_cts) > 1 else None
        try:
            peer = _run(_PEER, [str(model), tmp, str(args.threads), *demo_cts, str(REAL_CT)])
        except RuntimeError as e:
            peer = {"error": str(e)}
    ours = [per_ct[ct]["rows"][0]["inference_s"] for ct in demo_cts]
    peer_demo = peer.get("seconds", [])[:-1]
    dice = {}
    table = results / "qc" / "segmentation.tsv"
    if table.is_file():
        lines = table.read_text().splitlines()
        rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
        for name in ("femur_left", "femur_right", "hip_left", "hip_right", "gluteus_maximus_left",
                     "gluteus_medius_left", "iliopsoas_left"):
            values = [float(r[f"dice_{name}"]) for r in rows if r["split"] == "test" and r[f"dice_{name}"]]
            if values:
                dice[name] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                              "n": len(values)}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": args.threads,
                    "load_average_at_start": round(os.getloadavg()[0], 2)},
        "model": {k: training["nnunet"][k] for k in ("trainer", "configuration", "spacing_mm", "patch_size",
                                                      "features_per_stage", "epochs", "iterations_per_epoch")},
        "training_seconds": {k: round(v, 1) for k, v in training["seconds"].items()},
        "cpu": {
            "demo_ct_size": sizes[demo_cts[0]],
            "demo_inference_s_per_ct": {"median": round(statistics.median(ours), 2), "all": [round(t, 2) for t in ours]},
            "demo_model_load_s": round(statistics.median(per_ct[ct]["rows"][0]["load_model_s"] for ct in demo_cts), 2),
            "real_ct_size": sizes[str(REAL_CT)],
            "real_ct_inference_s": round(per_ct[str(REAL_CT)]["rows"][0]["inference_s"], 2),
            "peak_rss_mb_one_ct_per_process": {Path(ct).parent.name: round(per_ct[ct]["peak_rss_mb"])
                                               for ct in demo_cts + [str(REAL_CT)]},
            "peak_rss_mb_all_demo_cts_in_one_process": together and round(together["peak_rss_mb"]),
            "peer_nnunet_predict_from_files_s_per_ct": (
                {"median_demo": round(statistics.median(peer_demo), 2), "real_ct": round(peer["seconds"][-1], 2)}
                if "seconds" in peer else {"error": peer["error"]}),
            "ratio_ours_to_peer_demo": (round(statistics.median(ours) / statistics.median(peer_demo), 2)
                                        if peer_demo else None),
        },
        "gpu": "not measured: no GPU lent to the session that wrote this benchmark",
        "note": args.note,
        "demo_held_out_dice": dice,
    }
    out = REPO / "benchmarks" / "results" / "segment.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
