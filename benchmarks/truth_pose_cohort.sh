#!/usr/bin/env bash
# Shards of a large virtual cohort for decomposition-model experiments, made quickly: every patient goes
# through the pipeline's own commands (demo-cohort, ingest, calibrate, drr, bmd, pack) but with its TRUE
# labels and its TRUE radiograph pose, in place of the nnU-Net segmentation and the 2D/3D registration,
# which take most of a case's time on a CPU (77 s of registration a case on 2 cores). It isolates the
# model from the upstream errors: what a model learns here is a ceiling for the workflow's own shards.
# About 20 patients a minute on 2 cores; 200 patients are 400 hips and about 0.5 GB.
#
#   benchmarks/truth_pose_cohort.sh OUT N [JOBS] [VIEWS] [SITES] [PRESENTATION]
#
# SITES (default 0) is the demo's `sites`: 0, every patient's radiograph its own kVp and processing; N,
# the cohort's radiographs come from N acquisition protocols (1: one hospital's cohort). The patients,
# poses, DRRs and BMD targets are the same for every SITES; only the radiographs differ. PRESENTATION is
# the demo's `presentation` (processed, the default; raw: the detector's log signal on one scale, for
# models with `input_scale: detector`), the same way.
#
# With VIEWS > 0, each patient also gets VIEWS training views (benchmarks/truth_pose_views.py: other
# poses, kVp and processing; with VIEWS_PROTOCOL=same in the environment, other poses at the case's own
# protocol), each a case of its own (<case>_v<k>, the patient's id, the patient's
# density and labels, the view's true pose) packed with the others into OUT/shards_views (the same
# folds: a patient's views sit in its fold). Train on OUT/shards_views, evaluate on OUT/shards:
#
#   python benchmarks/train_folds.py --shards OUT/shards_views --eval-shards OUT/shards --folds 0 ...
#
# writes OUT/demo_input (the demo's case folders, made with config/config.yaml's demo settings and seed,
# without the DICOM CT series once used), OUT/cases/<case> (what the workflow's per-case stages write)
# and OUT/shards (what `bonedrr pack` writes, with config/config.yaml's shard settings). A case already
# done is skipped, so a killed run resumes. Then, e.g.:
#
#   python benchmarks/train_folds.py --shards OUT/shards --folds 0 --epochs 30 30 --threads 1 \
#       --set '{"network": {"condition": "tone"}}' --out /tmp/tone.json
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT N [JOBS] [VIEWS] [SITES] [PRESENTATION]" >&2; exit 2; }
out=$(realpath -m "$1"); n=$2; jobs=${3:-2}; views=${4:-0}; sites=${5:-0}; presentation=${6:-processed}
repo=$(cd "$(dirname "$0")/.." && pwd)
cli="${PYTHON:-$repo/.venv/bin/python} -m bonedrr"
mkdir -p "$out/logs" "$out/cases"

true_pose_drr_bmd() {  # DIR GEOMETRY_JSON ID: the true pose (GEOMETRY_JSON's "geometry") as a registration
  # record that passed its QA, then the DRRs and the BMD at it, in the case folder DIR
  local d=$1 id=$3
  "${PYTHON:-$repo/.venv/bin/python}" -c 'import json, sys
truth = json.load(open(sys.argv[1]))
json.dump({"geometry": truth["geometry"], "converged": True, "qa_flags": [], "similarity_value": 1.0}, open(sys.argv[2], "w"))' \
    "$2" "$d/pose.json"
  $cli drr --density "$d/density.nii.gz" --labels "$d/labels.nii.gz" --geometry "$d/pose.json" \
    --xray "$d/xray.nii.gz" --out "$d/drr.h5" --method siddon --device cpu --cut-mm 80 2> "$out/logs/$id.drr.log"
  $cli bmd --density "$d/density.nii.gz" --labels "$d/labels.nii.gz" --drr "$d/drr.h5" --case "$d/case.json" \
    --calibration "$d/calibration.json" --out "$d/bmd.json" --threshold 0.05 --cut-mm 80 2> "$out/logs/$id.bmd.log"
}

one_case() {
  local i=$1 id dir case_dir ct xray
  id=$(printf "demo_%03d" "$i"); dir=$out/demo_input/$id; case_dir=$out/cases/$id
  [ -f "$case_dir/bmd.json" ] && return 0
  # the demo's settings (config/config.yaml, cohorts.demo); case i draws from (seed, i) whatever N is
  $cli demo-cohort --out "$out/demo_input" --cases "$i" --n "$n" --seed 2026 --rows 192 --cols 320 \
    --pixel-mm 1.4 1.4 --sdd-mm 1100 --nifti-png-every 5 --abmd-range 0.45 1.15 --cut-mm 80 --extra-views 0 \
    --sites "$sites" --presentation "$presentation" 2> "$out/logs/$id.demo.log"
  ct=$dir/ct; [ -e "$ct" ] || ct=$dir/ct.nii.gz
  xray=$(ls "$dir"/xray.*)
  rm -rf "$case_dir.tmp"; mkdir -p "$case_dir.tmp"
  $cli ingest --case-id "$id" --cohort demo --out "$case_dir.tmp" --pixel-mm 1.4 1.4 --sdd-mm 1100 \
    --clinical-from "$dir/truth.json" --ct "$ct" --xray "$xray" --labels "$dir/labels.nii.gz" 2> "$out/logs/$id.ingest.log"
  cp "$dir/labels.nii.gz" "$case_dir.tmp/labels.nii.gz"  # the true labels, on the CT's grid
  $cli calibrate --ct "$case_dir.tmp/ct.nii.gz" --labels "$case_dir.tmp/labels.nii.gz" --case "$case_dir.tmp/case.json" \
    --out "$case_dir.tmp" --method phantom --cut-mm 80 --rods 0 100 200 400 800 --resin 0 2> "$out/logs/$id.calibrate.log"
  true_pose_drr_bmd "$case_dir.tmp" "$dir/truth.json" "$id"
  rm -rf "$case_dir" "$dir/ct"; mv "$case_dir.tmp" "$case_dir"
  echo "$id"
}
view_case() {  # one training view: ingest, the patient's density and labels, the view's true pose, drr, bmd
  local vc=$1 id=${1%_v*} case_dir
  case_dir=$out/view_cases/$vc
  [ -f "$case_dir/bmd.json" ] && return 0
  rm -rf "$case_dir.tmp"; mkdir -p "$case_dir.tmp"
  $cli ingest --case-id "$vc" --patient-id "$id" --cohort demo --out "$case_dir.tmp" --pixel-mm 1.4 1.4 --sdd-mm 1100 \
    --clinical-from "$out/demo_input/$id/truth.json" --ct "$out/cases/$id/ct.nii.gz" --xray "$out/views/$vc/xray.dcm" \
    2> "$out/logs/$vc.ingest.log"
  cp "$out/cases/$id/labels.nii.gz" "$out/cases/$id/density.nii.gz" "$out/cases/$id/calibration.json" "$case_dir.tmp/"
  true_pose_drr_bmd "$case_dir.tmp" "$out/views/$vc/view.json" "$vc"
  rm -f "$case_dir.tmp/ct.nii.gz"; rm -rf "$case_dir"; mv "$case_dir.tmp" "$case_dir"
  echo "$vc"
}
export -f true_pose_drr_bmd one_case view_case; export out n cli repo sites presentation
seq 0 $((n - 1)) | OMP_NUM_THREADS=1 xargs -P "$jobs" -I{} bash -c 'one_case {}' | \
  "${PYTHON:-$repo/.venv/bin/python}" -c 'import sys, tqdm
for _ in tqdm.tqdm(sys.stdin, total=int(sys.argv[1]), unit="case", desc="truth-pose cases"): pass' "$n"
$cli pack --cases "$out"/cases/demo_* --out "$out/shards" --cohort demo --crop-mm 240 120 --crop-px 128 64 \
  --head-position 0.3 0.7 --folds 5 --seed 0 --shard-size-mb 1000 --compression lzf --threshold 0.05
[ "$views" -gt 0 ] || exit 0
ids=$(seq 0 $((n - 1)) | xargs -I{} printf "demo_%03d\n" {})
echo "$ids" | OMP_NUM_THREADS=1 xargs -P "$jobs" -n 20 "${PYTHON:-$repo/.venv/bin/python}" "$repo/benchmarks/truth_pose_views.py" "$out" "$views" \
  2> "$out/logs/views.log"
mkdir -p "$out/view_cases"
for id in $ids; do for k in $(seq 1 "$views"); do echo "${id}_v$k"; done; done | OMP_NUM_THREADS=1 xargs -P "$jobs" -I{} bash -c 'view_case {}' | \
  "${PYTHON:-$repo/.venv/bin/python}" -c 'import sys, tqdm
for _ in tqdm.tqdm(sys.stdin, total=int(sys.argv[1]), unit="view", desc="training views"): pass' "$((n * views))"
$cli pack --cases "$out"/cases/demo_* "$out"/view_cases/demo_* --out "$out/shards_views" --cohort demo --crop-mm 240 120 \
  --crop-px 128 64 --head-position 0.3 0.7 --folds 5 --seed 0 --shard-size-mb 1000 --compression lzf --threshold 0.05
