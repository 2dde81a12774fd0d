#!/usr/bin/env bash
# bench/gpu_smoke.sh: the one-shot GPU check of issue 18, to run the moment a GPU is lent.
#
#   make gpu-wheels                # beforehand, where the registry is reachable: wheels/ (~24 MiB)
#   bash bench/gpu_smoke.sh        # on the GPU machine (device tool: carry ["wheels"]), < 10 min
#   bash bench/gpu_smoke.sh --cpu  # (or DEVICE=cpu) the same steps at a tiny size, on the CPU
#
# Steps, each under its own time limit within one overall budget (SMOKE_BUDGET seconds: 540 on
# the GPU, 1800 in CPU mode); a failed step is recorded and the next one still runs:
#   setup            wheels/ installed offline (pip --no-index --target) where modules are missing
#   regions_bench    bench.regions_bench, ViT-B-32 (random weights: nothing to download) at M = 300,
#                    with the pipeline's dataset stage (CPU, one core) running beside it
#   pipeline         python -m ovdistill run: the embedded default (toy), --device cuda,
#                    --distributor local (Ray's wheel, 76 MiB, is too large to travel)
#   train_bench      bench.train_bench on the built shards (a stand-in cache if the pipeline failed)
#   train, resume    trainer.train --stop-at half, then --resume latest to the end, on the device
#   eval_device      trainer.evaluate --ensemble of that checkpoint on the device
#   regions_agree    stored region rows (device, bf16) vs the same rows recomputed on the CPU (fp32)
#   eval_cpu         the same checkpoint evaluated on the CPU; eval_agree compares the two
# Results: $OUT when set (the device tool's folder), else runs/gpu_smoke/: summary.txt (the block
# BENCHMARKS.md's GPU section records, rewritten after every step), summary.json (every
# figure), steps.tsv (step, status, seconds), smoke.log (every step's output). The cache and runs go to SMOKE_WORK (default /tmp/ovd_gpu_smoke when $OUT is set, else
# runs/gpu_smoke/work), never into $OUT. PYTHON picks the interpreter (default: .venv/bin/python
# where it exists, else python3). The GPU machine's Python version, for `make gpu-wheels
# GPU_PYTHON=...`: python3 -c 'import sys; print(*sys.version_info[:2], sep=".")' (3.12 there).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=gpu
for arg in "$@"; do
    case $arg in
        --cpu) MODE=cpu ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "error: unknown argument '$arg' (bash bench/gpu_smoke.sh [--cpu])" >&2; exit 2 ;;
    esac
done
[ "${DEVICE:-}" = cpu ] && MODE=cpu
if [ "$MODE" = gpu ]; then DEV=cuda; else DEV=cpu; fi

RESULTS=${OUT:-$REPO/runs/gpu_smoke}
if [ -n "${OUT:-}" ]; then WORK=${SMOKE_WORK:-/tmp/ovd_gpu_smoke}; else WORK=${SMOKE_WORK:-$RESULTS/work}; fi
BUDGET=${SMOKE_BUDGET:-$([ "$MODE" = gpu ] && echo 540 || echo 1800)}
WHEELS=${WHEELS:-$REPO/wheels}
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}

if [ -e "$WORK" ] && [ ! -e "$WORK/.gpu_smoke" ]; then
    echo "error: $WORK exists and was not made by this script; set SMOKE_WORK to another folder" >&2
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$RESULTS"
touch "$WORK/.gpu_smoke"
: > "$WORK/steps.tsv"
LOG=$RESULTS/smoke.log
: > "$LOG"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# Sizes: the GPU figures, or the same steps tiny on the CPU.
if [ "$MODE" = gpu ]; then
    MANIFEST=data_manifests/toy.yaml
    REGIONS_ARGS=(--images 32 --m 300 --size 640x480 --batch-size 1024 --repeat 3 --pil-images 4)
    STAGE_SETS=(--set teacher.workers=4 --set rpn.num_workers=4)
    FIXTURE_SETS=()
    TRAIN_STEPS=200 LOADER_WORKERS=4 BENCH_STEPS=8 BENCH_WARMUP=2 EVAL_IMAGES=100 AGREE_IMAGES=10
else
    MANIFEST=$WORK/smoke.yaml
    REGIONS_ARGS=(--images 2 --m 8 --size 320x240 --batch-size 16 --repeat 1 --pil-images 1)
    STAGE_SETS=()
    FIXTURE_SETS=(--batch-size 2 --set "train_sizes=[96]" --set max_size=160 --set test_size=96)
    TRAIN_STEPS=4 LOADER_WORKERS=1 BENCH_STEPS=2 BENCH_WARMUP=1 EVAL_IMAGES=8 AGREE_IMAGES=4
fi
CACHE=$WORK/cache
RUNS=$WORK/runs
TRAIN_FLAGS=(--mode vild --heads separate --set center_targets=true --set contrastive_weight=1.0
             --set num_workers=$LOADER_WORKERS --set log_every=$((TRAIN_STEPS / 4 > 0 ? TRAIN_STEPS / 4 : 1)))

say() { echo "$*" | tee -a "$LOG"; }

# step NAME CAP CMD...: run CMD with at most CAP seconds (less when the budget is nearly spent),
# its output in $WORK/logs/NAME.log and smoke.log; one line per step in steps.tsv.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    local log=$WORK/logs/$name.log
    if [ "$limit" -lt 5 ]; then
        say "== $name: skipped (the ${BUDGET}s budget is spent)"
        printf '%s\tskipped\t0\n' "$name" >> "$WORK/steps.tsv"
        return 1
    fi
    say "== $name (limit ${limit}s): $*"
    local t0 t1 rc status
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status="failed($rc)" ;;
    esac
    cat "$log" >> "$LOG"
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    say "-- $name: $status in ${secs}s"
    [ "$status" = ok ] || tail -n 5 "$log" | sed 's/^/   | /'
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$WORK/steps.tsv"
    summarize --quiet  # so a run stopped from outside still leaves its figures so far
    return $rc
}

summarize() {
    cp "$WORK/steps.tsv" "$RESULTS/steps.tsv"
    "$PYTHON" -m ovdistill.bench.gpu_smoke summary --work "$WORK" --results "$RESULTS" --mode "$MODE" "$@"
}

ok() { awk -F'\t' -v n="$1" '$1 == n && $2 == "ok" { found = 1 } END { exit !found }' \
    "$WORK/steps.tsv"; }

# --------------------------------------------------------------------------------- setup
setup() {
    echo "mode $MODE (device $DEV), python $PYTHON, results $RESULTS, work $WORK"
    command -v nvidia-smi > /dev/null && nvidia-smi -L
    "$PYTHON" "$REPO/bench/gpu_wheels.py" --missing || return 1
    local need
    need=$("$PYTHON" "$REPO/bench/gpu_wheels.py" --missing | sed -n 's/^to install from wheels\/: //p')
    if [ "$need" != nothing ] || [ -n "${FORCE_WHEELS:-}" ]; then
        local site=$WORK/site
        if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
            echo "error: $need missing and no wheels in $WHEELS: run 'make gpu-wheels' where the registry is reachable and carry wheels/"
            return 1
        fi
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" "$WHEELS"/*.whl || return 1
        echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
        echo "$site" > "$WORK/site_path"
    fi
    [ -f "$WORK/site_path" ] && export PYTHONPATH=$(cat "$WORK/site_path"):$PYTHONPATH
    local after
    after=$("$PYTHON" "$REPO/bench/gpu_wheels.py" --missing)
    grep -q "^to install from wheels/: nothing$" <<< "$after" || {
        echo "error: modules still missing after the install: $after"; return 1; }
    "$PYTHON" -c "
import torch, faiss, open_clip, webdataset, pycocotools
from pathlib import Path
from ovdistill.bench.gpu_smoke import machine_line
line = machine_line()
Path('$WORK/machine.txt').write_text(line + '\\n')
print(line)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      'faiss', faiss.__version__, 'open_clip', open_clip.__version__, 'from',
      open_clip.__file__.rsplit('/open_clip/', 1)[0])
if '$DEV' == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('error: --device cuda but torch sees no GPU (use --cpu)')
"
}
export MODE DEV WORK WHEELS PYTHON RESULTS REPO
export -f setup
step setup 120 bash -c setup
[ -f "$WORK/site_path" ] && export PYTHONPATH=$(cat "$WORK/site_path"):$PYTHONPATH
if ! ok setup; then
    say "setup failed: nothing else can run"
fi

if ok setup; then
    [ "$MODE" = cpu ] && "$PYTHON" -m ovdistill.bench.gpu_smoke manifest --tiny "$MANIFEST"

    # The dataset stage (drawing the synthetic images: CPU work on one core) runs beside the
    # regions bench; the pipeline step then finds it done.
    DATASET_T0=$(date +%s)
    ( timeout --kill-after=10 $((DEADLINE - DATASET_T0 > 1 ? DEADLINE - DATASET_T0 : 1)) \
        "$PYTHON" -m ovdistill run --manifest "$MANIFEST" --cache "$CACHE" --stages dataset \
        --distributor local --no-progress > "$WORK/logs/dataset.log" 2>&1 ) &
    DATASET_PID=$!
    step regions_bench 150 "$PYTHON" -m ovdistill.bench.regions_bench --model ViT-B-32 --device "$DEV" \
        --threads 0 --no-cuda-vit "${REGIONS_ARGS[@]}"
    wait "$DATASET_PID"
    DATASET_RC=$?
    cat "$WORK/logs/dataset.log" >> "$LOG"
    say "-- dataset (beside the regions bench): exit $DATASET_RC after $(($(date +%s) - DATASET_T0))s"
    printf 'dataset_beside\t%s\t%s\n' "$([ $DATASET_RC = 0 ] && echo ok || echo "failed($DATASET_RC)")" \
        "$(($(date +%s) - DATASET_T0))" >> "$WORK/steps.tsv"

    step pipeline 330 "$PYTHON" -m ovdistill run --manifest "$MANIFEST" --cache "$CACHE" \
        --device "$DEV" --distributor local --no-progress "${STAGE_SETS[@]}"

    if ok pipeline; then
        step train_bench 120 "$PYTHON" -m ovdistill.bench.train_bench --manifest "$MANIFEST" --cache "$CACHE" \
            --device "$DEV" --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" \
            --num-workers "$LOADER_WORKERS"
        step train 120 "$PYTHON" -m ovdistill.trainer.train --manifest "$MANIFEST" --cache "$CACHE" \
            --out "$RUNS/train" --device "$DEV" --steps "$TRAIN_STEPS" \
            --stop-at $((TRAIN_STEPS / 2)) "${TRAIN_FLAGS[@]}"
        ok train && step resume 120 "$PYTHON" -m ovdistill.trainer.train --manifest "$MANIFEST" \
            --cache "$CACHE" --out "$RUNS/train" --device "$DEV" --steps "$TRAIN_STEPS" \
            --resume latest "${TRAIN_FLAGS[@]}"
        if ok resume; then
            step eval_device 90 "$PYTHON" -m ovdistill.trainer.evaluate --manifest "$MANIFEST" \
                --cache "$CACHE" --run "$RUNS/eval_$DEV" --checkpoint "$RUNS/train/latest.pt" \
                --ensemble --max-images "$EVAL_IMAGES" --device "$DEV"
        fi
        step regions_agree 90 "$PYTHON" -m ovdistill.bench.gpu_smoke regions-agreement --manifest "$MANIFEST" \
            --cache "$CACHE" --images "$AGREE_IMAGES" --json "$WORK/regions_agreement.json"
        if ok eval_device; then
            step eval_cpu 150 "$PYTHON" -m ovdistill.trainer.evaluate --manifest "$MANIFEST" \
                --cache "$CACHE" --run "$RUNS/eval_cpu_ref" --checkpoint "$RUNS/train/latest.pt" \
                --ensemble --max-images "$EVAL_IMAGES" --device cpu
            ok eval_cpu && step eval_agree 30 "$PYTHON" -m ovdistill.bench.gpu_smoke eval-agreement \
                "$RUNS/eval_$DEV/eval_ensemble.json" "$RUNS/eval_cpu_ref/eval_ensemble.json" \
                --json "$WORK/eval_agreement.json"
        fi
    else
        # the trainer's figures still come, from a generated stand-in cache
        step train_bench 120 "$PYTHON" -m ovdistill.bench.train_bench --fixture "$WORK/fixture" \
            --device "$DEV" --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" \
            --num-workers "$LOADER_WORKERS" "${FIXTURE_SETS[@]}"
    fi
fi

say ""
say "== summary ($(($(date +%s) - START)) s wall, budget ${BUDGET}s)"
summarize | tee -a "$LOG"
# exit status 0 only when every step ran and passed
awk -F'\t' '$2 != "ok" { bad = 1 } END { exit bad || NR == 0 }' "$WORK/steps.tsv"
