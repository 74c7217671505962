#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with an NVIDIA GPU, CUDA, PyTorch and CuPy
# (e.g. a lent cloud GPU without internet access): the GPU tests, the GPU DRR benchmark beside DiffDRR,
# registration on the GPU beside the same job on 2 CPU threads, and the cross-validated training of
# the decomposition model on the GPU.
#
# Usage: [STEPS="..."] [CASES="dir ..."] [TRAIN_SET=JSON] [EPOCHS="30 30"] [FOLDS="0 1"] \
#            bash benchmarks/gpu_checks.sh SHARDS OUT [EXTRA]
#   SHARDS  a cohort's shard folder (e.g. results/demo/shards) for the training step
#   OUT     folder for the logs and JSON results
#   EXTRA   optional folder holding what the machine lacks: sitk.tar.xz (SimpleITK unpacked), whl/*.whl
#           (installed without dependencies), diffdrr/ (the benchmark peer's package)
#   STEPS   which steps, in order (default: pytest_gpu drr_gpu train_folds_cuda; also: register, train_step)
#   CASES   case folders (density.nii.gz, labels.nii.gz, xray.nii.gz, case.json) for the register step:
#           each registered on the GPU, then the first once more on 2 CPU threads (a workflow job's)
#   TRAIN_SET, EPOCHS, FOLDS  passed to benchmarks/train_folds.py as --set, --epochs, --folds (TRAIN_SET
#           also to benchmarks/train_step.py: where a step's time goes)
#   LONG_EPOCHS  optional: the same folds trained again with these epochs (does accuracy still grow?)
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
gpu=${GPU_DEVICE:-cuda}  # cpu: try the steps' plumbing on a machine without a GPU
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, cupy, numba; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numba', numba.__version__)" >> "$out/gpu.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, and record the time and status
  local name=$1 limit=$2; shift 2
  local t=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$? ms=$(( ($(date +%s%N) - t) / 1000000 ))
  echo "$name rc=$rc seconds=$((ms / 1000)).$(printf %03d $((ms % 1000)))" | tee -a "$out/steps.txt"
}
register() {  # register CASE DEVICE NAME: one workflow registration job (default settings), timed by step
  OMP_NUM_THREADS=2 step "$3" 300 python3 -m bonedrr register --density "$1/density.nii.gz" \
    --labels "$1/labels.nii.gz" --xray "$1/xray.nii.gz" --case "$1/case.json" --out "$out/$3.json" \
    --device "$2" --seed 0
}
for s in ${STEPS:-pytest_gpu drr_gpu train_folds_cuda}; do
  case $s in
    pytest_gpu)
      step pytest_gpu 240 python3 -m pytest -q -p no:cacheprovider tests/test_render_gpu.py \
        tests/test_train_gpu.py tests/test_calibrate_drr.py -k "gpu or cuda or drr_cli" ;;
    drr_gpu)
      step drr_gpu 150 python3 benchmarks/drr_gpu.py --frames 200 --peer-frames 20 --out "$out/drr_gpu.json" ;;
    register)
      i=0
      for c in ${CASES:-}; do register "$c" "$gpu" "register_${gpu}_$i"; i=$((i + 1)); done
      first=(${CASES:-}); [ -n "${first:-}" ] && register "${first[0]}" cpu register_cpu_0 ;;
    train_folds_cuda)
      args=(--shards "$shards" --device "$gpu" --parallel 5 --threads 2 --set "${TRAIN_SET:-"{}"}")
      [ -n "${FOLDS:-}" ] && args+=(--folds $FOLDS)
      step train_folds_cuda 300 python3 benchmarks/train_folds.py "${args[@]}" ${EPOCHS:+--epochs $EPOCHS} \
        --models /tmp/bonedrr_models --out "$out/train_folds_cuda.json"
      if [ -n "${LONG_EPOCHS:-}" ]; then
        step train_folds_cuda_long 300 python3 benchmarks/train_folds.py "${args[@]}" --epochs $LONG_EPOCHS \
          --models /tmp/bonedrr_models_long --out "$out/train_folds_cuda_long.json"
      fi ;;
    train_step)
      step train_step 300 python3 benchmarks/train_step.py --shards "$shards" --device "$gpu" --epochs 2 \
        --set "${TRAIN_SET:-"{}"}" --out "$out/train_step.json" ;;
    *) echo "unknown step $s" | tee -a "$out/steps.txt" ;;
  esac
done
