#!/usr/bin/env bash
# Speed on one GPU, in one device call, each part under its own time limit:
#   step       the training step of the default recipe's loss (bench/bench_step.py) at the t5-small shape with GSE194122's
#              129,926-name vocabulary, full-size cells, bf16: eager, then compiled with CUDA graphs (reduce-overhead);
#              train tokens/s, MFU, operators and kernels a step
#   predict    predict.py, GEX to ATAC, on PREDICT_CELLS full-size simulated cells (bench/make_large.py) with the default
#              recipe's model shape and readout (bench_predict.py --write_timing_model), h5ad in, h5ad out: the default
#              flags, then larger batches, then those with a bf16 encoder; a cProfile of the larger batches
#   stability  the default recipe on MOp for STEPS steps in bf16, in fp32 with TF32, and in fp32 with TF32 from another
#              seed, side by side on the GPU; then the validation metrics of bf16 and of the other seed against fp32, with
#              a paired bootstrap (bench/compare_models.py): bf16 is within noise where it differs from fp32 no more than
#              another seed does. No test cells are read
# Inputs staged here by bench/gpu/prepare.sh (.gpu/whl, .gpu/data.tgz with mop, mop_tok and large/cell_sentences.json):
#   run(command="bash bench/gpu/speed.sh", carry=[".gpu"], timeout_s=600)
# What comes back under $OUT: step_eager.json, step_compiled.json, predict.json, stability.json, compare.json, env.log and
# logs.tgz (every log and the cProfile summary). Knobs (environment): PARTS ("step predict stability", in that order),
# BUDGET (540 s for the whole script), PREDICT_CELLS (20000), STEPS (3000), BATCH (256, the step part's cells a step),
# GPU_DIR (.gpu), and SMOKE=1: every part at toy sizes on the CPU, to check the plumbing (tests/test_bench_smoke.py), the
# compiled step only with SMOKE_COMPILE=1 (its compilation takes minutes on a CPU).
set -uo pipefail
OUT=${OUT:?OUT: the folder whose files come back}
WORK=${WORK:-/tmp/speed}
GPU_DIR=${GPU_DIR:-.gpu}
PARTS=${PARTS:-step predict stability}
BUDGET=${BUDGET:-540}; PREDICT_CELLS=${PREDICT_CELLS:-20000}; STEPS=${STEPS:-3000}; BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}; SHAPE=t5-small; STEP_ARGS=""; LARGE_ARGS=""; TRAIN_ARGS="--cpu_threads 5"; BOOT=2000
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SHAPE=tiny; PREDICT_CELLS=${PREDICT_CELLS_SMOKE:-64}; STEPS=4; BATCH=4; BOOT=50
  STEP_ARGS="--quick"; LARGE_ARGS="--quick"; TRAIN_ARGS="--cpu_threads 1 --calibration_cells 15 --max_eval_cells 15 --calibration_selection_repeats 1"
fi
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
SCRIPT=speed.sh; . "$(dirname "$0")/staged.sh"
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/results" && tar xzf "$GPU_DIR/data.tgz" -C "$WORK" || exit 4
L=$WORK/logs
collect() {  # whatever exists comes back, also after a timeout
  cp "$WORK"/results/*.json "$OUT"/ 2>/dev/null
  cp "$L/env.log" "$OUT"/ 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  true
}
trap collect EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  nproc; free -g | head -2; df -h "$WORK" | tail -1
  python3 -c "import torch, transformers, datasets, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"; } > "$L/env.log" 2>&1
cat "$L/env.log"
# run NAME SECONDS CMD...: a logged command under a time limit (never past the budget); prints its exit status and time
run() {
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  if [ "$limit" -lt 10 ]; then echo "$name: skipped, $budget s of the budget left"; return 124; fi
  local s; s=$(date +%s%N)
  timeout --kill-after=5 "$limit" "$@" > "$L/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - s) / 1000000 )); local wall=$(( ms / 1000 )).$(printf %03d $(( ms % 1000 )))
  echo "exit status $rc, wall seconds $wall" >> "$L/$name.log"
  echo "$name: rc $rc after $wall s (limit $limit s)"; tail -3 "$L/$name.log" | head -2
  return $rc
}

part_step() {
  local tag
  for tag in eager compiled; do
    if [ $tag = compiled ]; then
      [ "${SMOKE:-0}" = 1 ] && [ "${SMOKE_COMPILE:-0}" != 1 ] && return  # compiling costs minutes on a CPU
      set -- --steps 20 --warmup_steps 4 --torch_compile --torch_compile_mode reduce-overhead; local limit=240
    else
      set -- --steps 10 --warmup_steps 2; local limit=90
    fi
    run step_$tag $limit python3 bench/bench_step.py --device "$DEVICE" --mixed_precision bf16 --shapes "$SHAPE" --batch_size "$BATCH" \
      "$@" $STEP_ARGS --tag $tag --results_dir "$WORK/results"
    local rc=$?
    if [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 137 ] && [ $tag = compiled ]; then  # CUDA graphs failed (not slow): compiled without them
      run step_compiled_default 180 python3 bench/bench_step.py --device "$DEVICE" --mixed_precision bf16 --shapes "$SHAPE" \
        --batch_size "$BATCH" --steps 20 --warmup_steps 4 --torch_compile $STEP_ARGS --tag $tag --results_dir "$WORK/results"
    fi
    local f; f=$(ls "$WORK"/results/step_*_"$tag"*.json 2>/dev/null | head -1)  # bench_step writes step_DEVICE_TAG(.quick).json
    [ -n "$f" ] && mv "$f" "$WORK/results/step_$tag.json"
  done
}

part_predict() {
  local input=$WORK/large.h5ad
  run make_large 120 python3 bench/make_large.py $LARGE_ARGS --n_cells "$PREDICT_CELLS" --no_x --output "$input" || return
  run timing_model 60 python3 bench/bench_predict.py --dataset "$WORK/large" --write_timing_model "$WORK/timing" || return
  local base=(python3 predict.py --model "$WORK/timing" --input "$input" --direction gex2atac --output "$WORK/predicted.h5ad"
              --overwrite --no_progress --device "$DEVICE")
  local timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)  # peak RSS where GNU time is installed
  run predict_default 120 "${timer[@]}" "${base[@]}"
  run predict_b512 120 "${timer[@]}" "${base[@]}" --batch_size 512 --chunk_cells 4096
  run predict_b512_bf16 120 "${timer[@]}" "${base[@]}" --batch_size 512 --chunk_cells 4096 --precision bf16
  run predict_profile 120 python3 -m cProfile -o "$WORK/predict.prof" "${base[@]:1}" --batch_size 512 --chunk_cells 4096
  python3 - "$WORK" "$PREDICT_CELLS" > "$L/predict_summary.log" 2>&1 <<'PY'
import json, pstats, re, sys
from pathlib import Path
work, cells = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for name in ("predict_default", "predict_b512", "predict_b512_bf16"):
    log = work / "logs" / f"{name}.log"
    text = log.read_text() if log.exists() else ""
    done = re.search(r"exit status (\d+), wall seconds ([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not done or done.group(1) != "0":
        rows[name] = {"completed": False}
        continue
    seconds = float(done.group(2))
    own = re.search(r"wrote \S+: (\d+) cells x (\d+) features in ([\d.]+) s", text)  # predict.py's own time: no start-up
    rows[name] = {"completed": True, "cells": cells, "wall_seconds": seconds, "cells_per_s_wall": round(cells / seconds, 1),
                  "predict_seconds": float(own.group(3)) if own else None,
                  "cells_per_s": round(int(own.group(1)) / float(own.group(3)), 1) if own else None,
                  "features": int(own.group(2)) if own else None,
                  "peak_rss_gb": round(int(rss.group(1)) / 1e6, 2) if rss else None}
out = work / "predicted.h5ad"
summary = {"runs": rows, "output_bytes": out.stat().st_size if out.exists() else None, "target_cells_per_s": 10_000}
json.dump(summary, open(work / "results" / "predict.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
if (work / "predict.prof").exists():
    stats = pstats.Stats(str(work / "predict.prof"), stream=open(work / "logs" / "predict_profile_top.txt", "w"))
    stats.sort_stats("cumulative").print_stats(40)
PY
  cat "$L/predict_summary.log"
}

part_stability() {
  local budget; budget=$(left)
  local job=$(( budget - 130 ))  # the rest: the comparison
  [ "$job" -lt 60 ] && { echo "stability: skipped, $budget s of the budget left"; return 124; }
  local common=(python3 train.py --dataset_dir "$WORK/mop" --tokenizer_dir "$WORK/mop_tok" --max_steps "$STEPS" --early_stopping_patience 0
                --no_evaluate --no_blend --checkpointing_steps 0 --max_train_seconds "$job" --training_share 0.85 $TRAIN_ARGS)
  local s; s=$(date +%s)
  # bf16, fp32 with TF32, and fp32 with TF32 from another seed (the seed-to-seed difference bf16 is judged against)
  "${common[@]}" --output_dir "$WORK/bf16" --mixed_precision bf16 > "$L/train_bf16.log" 2>&1 &
  local bf16=$!
  "${common[@]}" --output_dir "$WORK/fp32" --mixed_precision no --tf32 > "$L/train_fp32.log" 2>&1 &
  local fp32=$!
  "${common[@]}" --output_dir "$WORK/fp32_seed2" --mixed_precision no --tf32 --seed 2 > "$L/train_fp32_seed2.log" 2>&1 &
  local seed2=$!
  wait $bf16; local rc_bf16=$?; wait $fp32; local rc_fp32=$?; wait $seed2; local rc_seed2=$?
  echo "stability: train rc bf16 $rc_bf16, fp32 $rc_fp32, fp32 seed 2 $rc_seed2 after $(( $(date +%s) - s )) s"
  if [ $rc_bf16 = 0 ] && [ $rc_fp32 = 0 ]; then
    local others=("$WORK/bf16"); [ $rc_seed2 = 0 ] && others+=("$WORK/fp32_seed2")
    run compare 120 python3 bench/compare_models.py --model "${others[@]}" --reference "$WORK/fp32" --dataset_dir "$WORK/mop" \
      --split validation --bootstrap "$BOOT" --device "$DEVICE" --output "$WORK/results/compare.json"
  fi
  python3 - "$WORK" > "$L/stability_summary.log" 2>&1 <<'PY'
import json, math, re, sys
from pathlib import Path
work = Path(sys.argv[1])
out = {}
for name in ("bf16", "fp32", "fp32_seed2"):
    log = (work / "logs" / f"train_{name}.log")
    text = log.read_text() if log.exists() else ""
    args = work / name / "training_args.json"
    facts = json.loads(args.read_text()) if args.exists() else {}
    losses = [float(x) for x in re.findall(r"step \d+ (?:train|validation)_loss ([-\w.+]+)", text)]
    out[name] = {"completed_steps": facts.get("completed_steps"), "planned_steps": facts.get("planned_steps"),
                 "train_seconds": facts.get("train_seconds"), "mixed_precision": facts.get("mixed_precision"),
                 "tf32": facts.get("tf32"), "seed": facts.get("seed"), "stopped_by_time_limit": facts.get("stopped_by_time_limit"),
                 "validation_history": facts.get("validation_history"),
                 "nan_in_log": bool(re.search(r"\bnan\b", text, re.IGNORECASE)),
                 "logged_losses": len(losses), "logged_losses_finite": all(math.isfinite(x) for x in losses) if losses else None}
json.dump(out, open(work / "results" / "stability.json", "w"), indent=2)
print(json.dumps({k: {kk: v[kk] for kk in ("completed_steps", "train_seconds", "nan_in_log")} for k, v in out.items()}))
PY
  cat "$L/stability_summary.log"
}

for part in $PARTS; do
  echo "== $part ($(left) s of the budget left)"
  "part_$part"
done
echo "all done in $(( $(date +%s) - start )) s"
