"""DRR speed and accuracy: bonedrr's CPU renderer against DiffDRR 0.6.1 (CPU), side by side in one run.

On the real CT (``../shared/data/totalseg-example`` when present, else the vendored copy), zero-padded
by 2 voxels so that where each renderer ends the volume does not matter; density = max(0, 1 + HU/1000)
g/cm3; all 62 TotalSegmentator labels as channels. Detectors of 256x256 and 128x128 pixels. The same
number of threads for numba (ours) and torch (DiffDRR). Accuracy: normalised cross-correlation (NCC)
and mean ratio against an independent dense-sampling trilinear projector (``bonedrr.demo.projector``,
0.25 mm steps), and between the two libraries' renderers of the same kind. Memory: peak resident
memory of a process rendering a 512^3 CT.

Run (needs DiffDRR, see benchmarks/README.md):
    python benchmarks/drr.py [--threads 2] [--repeats 5]
Writes benchmarks/results/drr.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bonedrr.demo.projector import project  # noqa: E402
from bonedrr.geometry import Geometry, ap_pose  # noqa: E402
from bonedrr.images import index_to_world  # noqa: E402
from bonedrr.render import Renderer  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "totalseg-example"
DATA = SHARED if SHARED.is_dir() else REPO / "resources" / "totalseg_example"


def ncc(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (compilation, caches)
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def load():
    ct = sitk.ConstantPad(sitk.ReadImage(str(DATA / "ct.nii.gz"), sitk.sitkFloat32), (2, 2, 2), (2, 2, 2), -1000.0)
    seg = sitk.ConstantPad(sitk.ReadImage(str(DATA / "labels.nii.gz")), (2, 2, 2), (2, 2, 2), 0)
    density = np.clip(1.0 + sitk.GetArrayFromImage(ct) / 1000.0, 0, None).astype(np.float32)  # g/cm3
    labels = sitk.GetArrayFromImage(seg)
    ids = np.unique(labels)
    compact = np.searchsorted(ids, labels).astype(np.uint8)  # 0..61, 0 = unlabelled
    return ct, density, labels, compact, len(ids)


def geometry_for(ct: sitk.Image, size: int) -> Geometry:
    a = index_to_world(ct)
    centre = a[:3, :3] @ ((np.array(ct.GetSize()) - 1) / 2) + a[:3, 3]
    pixel = 460.0 / size  # the detector sees about 320 mm at the volume's centre
    return Geometry.centered(1000.0, size, size, (pixel, pixel),
                             ap_pose(centre, 700.0, rotvec_deg=(5, -3, 10), shift_mm=(4, -6, 10)))


def memory_probe(method: str, threads: int) -> None:
    """Child process: render a 512^3 CT (the real one resampled) and print peak RSS and time."""
    import numba

    numba.set_num_threads(threads)
    ct = sitk.ReadImage(str(DATA / "ct.nii.gz"), sitk.sitkFloat32)
    size = (512, 512, 512)
    spacing = [s * n / m for s, n, m in zip(ct.GetSpacing(), ct.GetSize(), size)]
    big = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(),
                        -1000.0, sitk.sitkFloat32)
    density = np.clip(1000.0 + sitk.GetArrayFromImage(big), 0, None).astype(np.float32)  # mg/cm3
    del big
    channels = np.zeros(density.shape, np.uint8)
    renderer = Renderer(density, channels, index_to_world(sitk.Image(size, sitk.sitkUInt8)) @ np.diag(
        [*spacing, 1.0]), method=method, device="cpu")
    del density, channels
    g = Geometry.centered(1000.0, 256, 256, (1.8, 1.8), ap_pose(
        renderer.index_to_world[:3, :3] @ (np.array(size) / 2.0) + renderer.index_to_world[:3, 3], 700.0))
    renderer.render(g)
    t = time.perf_counter()
    renderer.render(g)
    elapsed = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak_mb), "render_s": round(elapsed, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-probe", choices=["siddon", "trilinear"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.threads)

    import numba
    import torch

    from peers.diffdrr_peer import DiffDRRPeer

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    ct, density, labels, compact, n_labels = load()
    affine = index_to_world(ct)
    result = {
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "threads": args.threads,
                    "python": platform.python_version(), "numba": numba.__version__, "torch": torch.__version__,
                    "diffdrr": __import__("diffdrr").__version__ if hasattr(__import__("diffdrr"), "__version__")
                    else "0.6.1"},
        "data": {"ct": str(DATA / "ct.nii.gz"), "size": list(ct.GetSize()), "spacing_mm": list(ct.GetSpacing()),
                 "labels": n_labels, "padding_voxels": 2},
        "repeats": args.repeats, "sizes": {},
    }
    for size in (256, 128):
        g = geometry_for(ct, size)
        reference = project({"d": density}, ct, g, step_mm=0.25)["d"]
        rows = {}

        def record(name, seconds, image):
            rows[name] = {"seconds": round(seconds, 4), "ncc_vs_reference": round(ncc(image, reference), 6),
                          "mean_ratio_vs_reference": round(float(image.mean() / reference.mean()), 6)}

        for method in ("siddon", "trilinear"):
            single = Renderer(density * 1000, np.zeros_like(compact), affine, method=method, device="cpu")
            t, single_image = timed(lambda: single.render(g), args.repeats)
            record(f"bonedrr_{method}", t, single_image[0])
            allc = Renderer(density * 1000, compact, affine, n_channels=n_labels, method=method, device="cpu")
            t, img = timed(lambda: allc.render(g), args.repeats)
            record(f"bonedrr_{method}_all_channels", t, img.sum(0))
            rows[f"bonedrr_{method}_all_channels"]["channel_sum_vs_single_max_abs_diff_g_cm2"] = float(
                np.abs(img.sum(0) - single_image[0]).max())
            arr = Renderer(density * 1000, compact, affine, n_channels=n_labels, method=method, device="cpu",
                           backend="array")
            t, img = timed(lambda: arr.render(g), 1)
            record(f"bonedrr_{method}_all_channels_numpy_array_path", t, img.sum(0))
            peer = DiffDRRPeer(density, ct, g, renderer=method, pad_voxels=0)
            t, img_peer = timed(lambda: peer.render(), args.repeats)
            record(f"diffdrr_{method}", t, img_peer)
            peer_all = DiffDRRPeer(density, ct, g, renderer=method, labels=labels, pad_voxels=0)
            t, img_all = timed(lambda: peer_all.render(), args.repeats)
            record(f"diffdrr_{method}_all_channels", t, img_all.sum(0))
            ours = single_image[0]
            rows[f"bonedrr_{method}"]["ncc_vs_diffdrr_same_method"] = round(ncc(ours, img_peer), 6)
            rows[f"bonedrr_{method}"]["mean_ratio_vs_diffdrr_same_method"] = round(
                float(ours.mean() / img_peer.mean()), 6)
        ratios = {}
        for method in ("siddon", "trilinear"):
            ratios[f"{method}_speedup_vs_diffdrr"] = round(
                rows[f"diffdrr_{method}"]["seconds"] / rows[f"bonedrr_{method}"]["seconds"], 2)
            ratios[f"{method}_all_channels_speedup_vs_diffdrr_all_channels"] = round(
                rows[f"diffdrr_{method}_all_channels"]["seconds"] / rows[f"bonedrr_{method}_all_channels"]["seconds"],
                2)
            ratios[f"{method}_all_channels_cost_vs_single"] = round(
                rows[f"bonedrr_{method}_all_channels"]["seconds"] / rows[f"bonedrr_{method}"]["seconds"], 2)
            ratios[f"{method}_numba_speedup_vs_numpy_array_path"] = round(
                rows[f"bonedrr_{method}_all_channels_numpy_array_path"]["seconds"]
                / rows[f"bonedrr_{method}_all_channels"]["seconds"], 1)
        result["sizes"][f"{size}x{size}"] = {"renderers": rows, "ratios": ratios}
        print(json.dumps(result["sizes"][f"{size}x{size}"], indent=1), flush=True)
    memory = {}
    for method in ("siddon", "trilinear"):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", method, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        memory[method] = json.loads(out.stdout.strip().splitlines()[-1])
    result["memory_512_cubed_ct_256x256_drr"] = memory
    out = REPO / "benchmarks" / "results" / "drr.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(memory, indent=1))


if __name__ == "__main__":
    main()
