#!/usr/bin/env bash
# The t5-small shape on MOp on one GPU, in one device call: train the t5-small shape with MOp's chosen recipe
# (docs/results.md), calibrate it as train.py does, and score it with eval.py on validation and on test.
# Inputs staged by bench/gpu/prepare.sh (.gpu/whl, .gpu/data.tgz); from here:
#   run(command="bash bench/gpu/t5small_mop.sh", carry=[".gpu"], timeout_s=600)
# What comes back under $OUT: the logs, both eval_results.json (as eval_validation.json, eval_test.json), the folder's readout.json and
# training_args.json. Score validation here: copy eval_validation.json to D/eval_results.json, then
# `python -m evaluation.crossval pool --baselines evbase_mop --candidate t5small D ...` beside the CPU models' validation runs.
# Knobs (environment): STEPS (1000), BATCH (128), LR (5e-4), WARMUP (100), PRECISION (no: fp32 with TF32 matrix products,
# train.py --tf32; bf16 at lr 1e-3 diverges on this recipe), TEST_IF_BETTER_THAN (unset: always score test; else an earlier
# run's eval_validation.json: test is scored only when this run's validation RMSE is lower in both directions), TRAIN_SECONDS (240: train.py --max_train_seconds, the guard
# that keeps training, refit, calibration and both evaluations inside one 10-minute call), EVAL_BATCH (128), REPEATS (1: the calibration's partitions; on MOp's 841 cells 1 and 10 gave both final models
# bit-identical readouts, and 10 cost ~4 more minutes on a CPU, too many for one 10-minute call), SHAPE (t5-small), THREADS (16), and SMOKE=1 for a
# few tiny CPU steps that check the plumbing (tests/test_bench_smoke.py runs it on synthetic cells, GPU_DIR: where
# data.tgz and whl/ lie, default .gpu).
set -uo pipefail
OUT=${OUT:?OUT: the folder whose files come back}
WORK=${WORK:-/tmp/t5small_mop}
STEPS=${STEPS:-1000}; BATCH=${BATCH:-128}; LR=${LR:-5e-4}; WARMUP=${WARMUP:-100}; PRECISION=${PRECISION:-no}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}; EVAL_BATCH=${EVAL_BATCH:-128}
GPU_DIR=${GPU_DIR:-.gpu}; REPEATS=${REPEATS:-1}; SHAPE=${SHAPE:-t5-small}; THREADS=${THREADS:-16}; EVAL_CELLS=${EVAL_CELLS:-841}
if [ "${SMOKE:-0}" = 1 ]; then STEPS=4; BATCH=8; WARMUP=1; SHAPE=tiny; REPEATS=2; THREADS=1; EVAL_CELLS=${EVAL_CELLS_SMOKE:-8}; EVAL_BATCH=8; fi
SCRIPT=t5small_mop.sh; . "$(dirname "$0")/staged.sh"
rm -rf "$WORK" && mkdir -p "$WORK" && tar xzf "$GPU_DIR/data.tgz" -C "$WORK" || exit 4
M=$WORK/model_$SHAPE
collect() {  # whatever exists comes back, also after a timeout
  cp "$WORK"/*.log "$OUT"/ 2>/dev/null
  cp "$M/readout.json" "$OUT/readout.json" 2>/dev/null
  cp "$M/training_args.json" "$OUT/training_args.json" 2>/dev/null
  cp "$WORK/eval_validation/eval_results.json" "$OUT/eval_validation.json" 2>/dev/null
  cp "$WORK/eval_test/eval_results.json" "$OUT/eval_test.json" 2>/dev/null
  true
}
trap collect EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'datasets', datasets.__version__)"; } > "$WORK/env.log" 2>&1
cat "$WORK/env.log"
start=$(date +%s)
# MOp's chosen recipe (docs/results.md: cap 6, dropout 0.2, label smoothing 0.1, source dropout 0.1), t5-small shape,
# fewer and larger steps than on the CPU (5,400 x 32 cells there: 11 epochs; 1,000 x 128 here: 8 epochs)
python3 train.py --dataset_dir "$WORK/mop" --tokenizer_dir "$WORK/mop_tok" --output_dir "$M" --model_size "$SHAPE" \
  --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --warmup_steps "$WARMUP" \
  --mixed_precision "$PRECISION" --tf32 --max_train_seconds "$TRAIN_SECONDS" --per_device_eval_batch_size "$EVAL_BATCH" --max_gex_target_length 6 --dropout_rate 0.2 --label_smoothing 0.1 --source_dropout 0.1 \
  --max_target_length 128 --eval_steps "$((STEPS / 5 > 0 ? STEPS / 5 : 1))" --checkpointing_steps 0 --no_evaluate \
  --cpu_threads "$THREADS" --calibration_cells "$EVAL_CELLS" --max_eval_cells "$EVAL_CELLS" \
  --calibration_selection_repeats "$REPEATS" > "$WORK/train.log" 2>&1
rc=$?; echo "train rc $rc after $(( $(date +%s) - start )) s"; tail -3 "$WORK/train.log"
[ $rc = 0 ] || exit $rc
for split in validation test; do
  s=$(date +%s)
  if [ $split = test ] && [ -n "${TEST_IF_BETTER_THAN:-}" ]; then
    python3 - "$WORK/eval_validation/eval_results.json" "$TEST_IF_BETTER_THAN" <<'PY' || { echo "test not scored: validation RMSE not lower in both directions than $TEST_IF_BETTER_THAN"; break; }
import json, sys
new, old = (json.load(open(f))["directions"] for f in sys.argv[1:3])
better = {d: new[d]["model"]["rmse"] < old[d]["model"]["rmse"] for d in old}
print("validation RMSE, this run vs the reference:", {d: (round(new[d]["model"]["rmse"], 6), round(old[d]["model"]["rmse"], 6)) for d in old})
sys.exit(0 if all(better.values()) else 1)
PY
  fi
  python3 eval.py --model "$M" --dataset_dir "$WORK/mop" --dataset_name mop_snareseq --split $split --baselines mean --batch_size "$EVAL_BATCH" \
    --no_plots --no_update_model_folder --output_dir "$WORK/eval_$split" > "$WORK/eval_$split.log" 2>&1
  rc=$?; echo "eval $split rc $rc after $(( $(date +%s) - s )) s"
  if [ $rc != 0 ]; then  # the readout on the GPU failed: the same evaluation on the CPU, so the trained model still gets its row
    tail -20 "$WORK/eval_$split.log"  # in the call's output; its log is replaced below (at most 8 files come back)
    python3 eval.py --model "$M" --dataset_dir "$WORK/mop" --dataset_name mop_snareseq --split $split --baselines mean --device cpu \
      --no_plots --no_update_model_folder --output_dir "$WORK/eval_$split" > "$WORK/eval_$split.log" 2>&1
    rc=$?; echo "eval $split on the CPU rc $rc after $(( $(date +%s) - s )) s"; [ $rc = 0 ] || exit $rc
  fi
done
echo "all done in $(( $(date +%s) - start )) s"
