#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with an NVIDIA GPU, CUDA, PyTorch and CuPy
# (e.g. a lent cloud GPU without internet access): the GPU tests, the GPU DRR benchmark beside DiffDRR,
# and the cross-validated training of the decomposition model on the GPU.
#
# Usage: bash benchmarks/gpu_checks.sh SHARDS OUT [EXTRA]
#   SHARDS  a cohort's shard folder (e.g. results/demo/shards) for the training check
#   OUT     folder for the logs and JSON results
#   EXTRA   optional folder holding what the machine lacks: sitk.tar.xz (SimpleITK unpacked), whl/*.whl
#           (installed without dependencies), diffdrr/ (the benchmark peer's package)
set -u
shards=$1; out=$2; extra=${3:-}
mkdir -p "$out"
if [ -n "$extra" ]; then
  site=/tmp/bonedrr_site; mkdir -p $site
  [ -f "$extra/sitk.tar.xz" ] && tar -xJf "$extra/sitk.tar.xz" -C $site
  ls "$extra"/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target $site "$extra"/whl/*.whl
  export PYTHONPATH=$site:$extra:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, cupy, numba; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numba', numba.__version__)" >> "$out/gpu.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, and record the time and status
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( $(date +%s) - t ))" | tee -a "$out/steps.txt"
}
step pytest_gpu 150 python3 -m pytest -q -p no:cacheprovider tests/test_render_gpu.py \
  tests/test_train_gpu.py tests/test_calibrate_drr.py -k "gpu or cuda or drr_cli"
step drr_gpu 150 python3 benchmarks/drr_gpu.py --frames 200 --peer-frames 20 --out "$out/drr_gpu.json"
step train_folds_cuda 200 python3 benchmarks/train_folds.py --shards "$shards" --device cuda --parallel 5 \
  --threads 2 --models /tmp/bonedrr_models --out "$out/train_folds_cuda.json"
# Optional: the same folds trained longer (LONG_EPOCHS="600 600"), to see whether accuracy still grows.
if [ -n "${LONG_EPOCHS:-}" ]; then
  step train_folds_cuda_long 180 python3 benchmarks/train_folds.py --shards "$shards" --device cuda --parallel 5 \
    --threads 2 --epochs $LONG_EPOCHS --models /tmp/bonedrr_models_long --out "$out/train_folds_cuda_long.json"
fi
