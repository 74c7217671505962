"""GPU DRR throughput (run where an NVIDIA GPU and CuPy are present), with the CPU path beside it.

A 512x512x400 CT (the real CT resampled), 256x256 DRRs at poses varying per frame, all 16 structures
of the DRR stage in one pass. Reports DRRs per second for the hand-written CUDA kernels and the CuPy
array path, and the physical limit: (bytes of the volume a DRR touches) / (memory bandwidth), where the
bytes touched are estimated as (voxels crossed per ray x rays) x 5 bytes (float32 density + uint8
channel), an upper bound on what caches can save.

Side by side, in the same run when it is installed: DiffDRR 0.6.1 (``peers/diffdrr_peer.py``) on the
same GPU, same volume, labels, detector and poses, all 16 structures split per ray
(``mask_to_channels``), its Siddon and trilinear renderers; with its agreement with ours (NCC of the
channel sums) and our speed over its as a ratio.

Run: python benchmarks/drr_gpu.py [--frames 200] [--peer-frames 20]
Writes benchmarks/results/drr_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonedrr.device import cuda_available
from bonedrr.geometry import Geometry, ap_pose
from bonedrr.images import index_to_world
from bonedrr.labels import PRESETS, remap
from bonedrr.render import Renderer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--peer-frames", type=int, default=20, help="frames for DiffDRR (0: leave it out)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "drr_gpu.json"))
    args = parser.parse_args()
    if not cuda_available():
        raise SystemExit("no CUDA device: run this where a GPU is present")
    import cupy

    ct = sitk.ReadImage(str(REPO / "resources" / "totalseg_example" / "ct.nii.gz"), sitk.sitkFloat32)
    size = (512, 512, 400)
    spacing = [s * n / m for s, n, m in zip(ct.GetSpacing(), ct.GetSize(), size)]
    big = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(),
                        -1000.0, sitk.sitkFloat32)
    density = np.clip(1000.0 + sitk.GetArrayFromImage(big), 0, None).astype(np.float32)
    labels = sitk.Resample(sitk.ReadImage(str(REPO / "resources" / "totalseg_example" / "labels.nii.gz")), big,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    label_sets = {  # the real CT's structures, and a worst case whose label changes at every voxel
        "real_labels": remap(sitk.GetArrayFromImage(labels), PRESETS["totalsegmentator_v2"]).astype(np.uint8),
        "striped_labels": (np.arange(density.size, dtype=np.int64).reshape(density.shape) % 16).astype(np.uint8)}
    affine = index_to_world(big)
    centre = affine[:3, :3] @ ((np.array(size) - 1) / 2) + affine[:3, 3]
    rng = np.random.default_rng(0)
    poses = [ap_pose(centre, 700.0, rng.uniform(-5, 5, 3), rng.uniform(-10, 10, 3)) for _ in range(args.frames)]
    g = Geometry.centered(1000.0, 256, 256, (1.8, 1.8))
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    bandwidth = 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8  # bytes/s (DDR)
    result = {"gpu": props["name"].decode(), "volume": list(size), "detector": [256, 256], "channels": 16,
              "frames": args.frames, "peak_bandwidth_gb_s": round(bandwidth / 1e9, 1), "label_sets": {}}
    for name, channels in label_sets.items():
        rows = result["label_sets"][name] = {}
        first_frames = {}  # our compiled renderers' channels at the first pose, for the peer's agreement
        for method in ("siddon", "trilinear"):
            # the array path (0.2 DRRs/s trilinear) only once, on the real labels
            backends = ("compiled", "array") if name == "real_labels" and method == "siddon" else ("compiled",)
            for backend in backends:
                r = Renderer(density, channels, affine, n_channels=16, method=method, device="cuda", backend=backend)
                r.render(g.with_pose(poses[0]))
                frames = args.frames if backend == "compiled" else 3
                cupy.cuda.Stream.null.synchronize()
                t = time.perf_counter()
                for pose in poses[:frames]:
                    r.render(g.with_pose(pose))
                cupy.cuda.Stream.null.synchronize()
                per_second = frames / (time.perf_counter() - t)
                rows[f"{method}_{backend}"] = {"drrs_per_second": round(per_second, 1)}
                if backend == "compiled":  # the DRRs left on the GPU (a GPU registration loop's case)
                    t = time.perf_counter()
                    for pose in poses[:frames]:
                        r.render(g.with_pose(pose), on_device=True)
                    cupy.cuda.Stream.null.synchronize()
                    rows[f"{method}_{backend}"]["drrs_per_second_left_on_gpu"] = round(
                        frames / (time.perf_counter() - t), 1)
                    first_frames[method] = r.render(g.with_pose(poses[0]))
                    rows[f"{method}_{backend}"]["kernel_ms"] = round(kernel_ms(r, g.with_pose(poses[0]), cupy), 3)
                del r
            # Physical limit: voxels crossed per ray ~ (ray length in voxels) x 3 for Siddon, 8 per sample
            # for trilinear.
            voxels_per_ray = 3 * max(size) if method == "siddon" else 8 * 2 * max(size)
            touched = 256 * 256 * voxels_per_ray * 5
            rows[f"{method}_compiled"]["bound_drrs_per_second_at_peak_bandwidth"] = round(bandwidth / touched, 1)
        if args.peer_frames and name == "real_labels":
            add_diffdrr(rows, first_frames, density, channels, big, g, poses[:args.peer_frames], cupy)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def kernel_ms(renderer: Renderer, geometry: Geometry, cupy, repeats: int = 20) -> float:
    """Milliseconds of the CUDA kernel alone (CUDA events): the rest of a DRR's time is the few numbers
    copied to the GPU, the scaling to float32 g/cm2 and the copy back."""
    from bonedrr.render import cuda_kernels

    params = cuda_kernels.ray_parameters(geometry, renderer.world_to_index, *renderer._box)
    args = (renderer.method, renderer.density, renderer.channels, renderer.shape, renderer.n_channels, params,
            geometry.rows, geometry.cols, renderer.step_mm)
    cuda_kernels.render(*args)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        cuda_kernels.render(*args)
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / repeats


def add_diffdrr(rows: dict, first_frames: dict, density, channels, grid, geometry, poses, cupy,
                device: str = "cuda") -> None:
    """DiffDRR at the same geometry on the same GPU into ``rows``: DRRs per second, NCC with ours, our speed-up."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import diffdrr
        from peers.diffdrr_peer import DiffDRRPeer
    except ImportError as err:
        rows["diffdrr"] = f"not installed ({err})"
        return
    rows["diffdrr_version"] = getattr(diffdrr, "__version__", "0.6.1")
    ratios = rows.setdefault("ratios", {})
    for method in ("siddon", "trilinear"):
        ours = first_frames[method]
        ours = np.asarray(ours.get() if hasattr(ours, "get") else ours, float).sum(0)
        try:
            peer = DiffDRRPeer(density / 1000.0, grid, geometry.with_pose(poses[0]), renderer=method,
                               labels=channels, pad_voxels=0, device=device)
            theirs = peer.render(poses[0]).sum(0)
            t = time.perf_counter()
            for pose in poses:
                peer.render(pose)  # returns a NumPy array: synchronised
        except torch.cuda.OutOfMemoryError as err:
            rows[f"diffdrr_{method}"] = {"error": f"out of GPU memory: {str(err).splitlines()[0]}"}
            continue
        per_second = len(poses) / (time.perf_counter() - t)
        ncc = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
        rows[f"diffdrr_{method}"] = {"drrs_per_second": round(per_second, 2), "ncc_vs_bonedrr": round(ncc, 6),
                                     "mean_ratio_vs_bonedrr": round(float(theirs.mean() / ours.mean()), 6)}
        ratios[f"{method}_speedup_vs_diffdrr"] = round(
            rows[f"{method}_compiled"]["drrs_per_second"] / per_second, 2)
        del peer
        if device == "cuda":
            torch.cuda.empty_cache()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
