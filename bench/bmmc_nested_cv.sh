#!/usr/bin/env bash
# Nested cross-validation of "train the final BMMC model on every cell of the training donor"
# against "the fold-0 model" (pooled results: docs/results/cv/bmmc_starter_nested*.json).
#
#   bash bench/bmmc_nested_cv.sh [WORK_DIR]      # default .dev/bmmc_nested; about 35 min on 2 CPU cores
#
# Outer folds: the 5 cross-validation folds of donor s1d1 (each scored once, as the test split of the inner datasets);
# inner folds: the other four. Inner model (k, j) trains on the three folds other than k and j, validation fold j
# (the fold commands of the two recipes: the model's on rank sentences, seed_binary's on binary ones).
#   (a) fold model: inner model (k, first j) with the calibration pooled over the four inner models' readings;
#                   baselines fit on its training folds, tuned on fold j.
#   (b) every cell: a model trained on the four inner folds (dataset_builder --no_validation), its head refit settings
#                   pooled over the four inner models (train.py --profile_choices_from), the same pooled calibration;
#                   baselines tuned on fold j, then fit on the four inner folds (eval.py --refit_baselines).
#   ens4 / ens5: the four inner models averaged (translator.ensemble), without / with the every-cell model.
#   stack: ens5 (the model) / ens4 (seed_binary) with the source-kernel stack (translator.stack), its kernel
#                   settings and weights chosen on the four inner models' readings of the folds they did not train on.
# Pooled with `python -m evaluation.crossval pool` into WORK_DIR/pool_a.json, pool_b.json, pool_ens.json and pool_stack.json.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$REPO/.dev/bmmc_nested}
H5=${BMMC_COMBINED:-$REPO/../shared/data/bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad}
[ -f "$H5" ] || { echo "error: $H5 not found (set BMMC_COMBINED to the starter's combined h5ad)" >&2; exit 2; }
export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
mkdir -p "$WORK" && cd "$WORK"
[ -f bmmc_folds.h5ad ] || python -m evaluation.crossval folds --input "$H5" --batch s1d1 --folds 5 --output bmmc_folds.h5ad
[ -f s1d1.h5ad ] || python -c "
import anndata as ad
a = ad.read_h5ad('bmmc_folds.h5ad')
a[a.obs['batch'] != 's1d2'].copy().write_h5ad('s1d1.h5ad')"
build() { [ -d "$1" ] || python -m dataset_builder --input s1d1.h5ad --output_dir "$@" > /dev/null 2>&1; }
for k in 0 1 2 3 4; do
  for j in 0 1 2 3 4; do
    [ $j = $k ] && continue
    build n$k$j --test_batches s1d1_f$k --validation_batches s1d1_f$j
    build nb$k$j --test_batches s1d1_f$k --validation_batches s1d1_f$j --gex_encoding binary
  done
  build a$k --test_batches s1d1_f$k --no_validation
  build ab$k --test_batches s1d1_f$k --no_validation --gex_encoding binary
done
[ -d tok ] || python -m tokenizer --dataset n01 --output_dir tok
[ -d tokb ] || python -m tokenizer --dataset nb01 --output_dir tokb
COMMON="--model_size tiny --learning_rate 2e-3 --max_steps 50 --warmup_steps 10 --per_device_train_batch_size 32 --max_target_length 128 --eval_steps 50 --checkpointing_steps 0 --no_evaluate --cpu_threads 1 --profile_ranks 4 8 16 32 64"
REC_M="--source_dropout 0.1 --gex_source_downsample 0.5"
REC_B="--weight_average_fraction 0.25 --source_dropout 0.1 --calibration_selection_parts 0"
for k in 0 1 2 3 4; do
  for j in 0 1 2 3 4; do
    [ $j = $k ] && continue
    ( [ -f m$k$j/readout.json ] || python "$REPO/train.py" --dataset_dir n$k$j --tokenizer_dir tok --output_dir m$k$j $COMMON $REC_M > log_m$k$j.txt 2>&1 ) &
    ( [ -f mb$k$j/readout.json ] || python "$REPO/train.py" --dataset_dir nb$k$j --tokenizer_dir tokb --output_dir mb$k$j $COMMON $REC_B > log_mb$k$j.txt 2>&1 ) &
    wait
  done
  echo "inner models of outer fold $k trained $(date +%T)"
done
one() {  # kind k; kind m (rank sentences) or mb (binary)
  local kind=$1 k=$2 n=n a=a rec=$REC_M tk=tok
  if [ "$kind" = mb ]; then n=nb; a=ab; rec=$REC_B; tk=tokb; fi
  local js=() pool=() from=() rest=()
  for j in 0 1 2 3 4; do [ $j = $k ] && continue; js+=($j); pool+=(--pool $kind$k$j $n$k$j); from+=($kind$k$j); done
  local j0=${js[0]}
  for j in "${js[@]:1}"; do rest+=(--pool $kind$k$j $n$k$j); done
  if [ ! -f ev_${kind}_a$k/eval_results.json ]; then
    rm -rf P_${kind}_a$k && cp -r $kind$k$j0 P_${kind}_a$k
    python -m translator.recalibrate --model P_${kind}_a$k --dataset_dir $n$k$j0 "${rest[@]}"
    python "$REPO/eval.py" --model P_${kind}_a$k --dataset_dir $n$k$j0 --dataset_name bmmc_starter --split test --no_plots \
      --no_update_model_folder --output_dir ev_${kind}_a$k > /dev/null 2>&1
  fi
  if [ ! -f ev_${kind}_b$k/eval_results.json ]; then
    [ -f A_${kind}_$k/readout.json ] || python "$REPO/train.py" --dataset_dir $a$k --tokenizer_dir $tk --output_dir A_${kind}_$k $COMMON $rec \
      --profile_choices_from "${from[@]}" > log_A_${kind}_$k.txt 2>&1
    python -m translator.recalibrate --model A_${kind}_$k --dataset_dir $a$k "${pool[@]}"
    python "$REPO/eval.py" --model A_${kind}_$k --dataset_dir $n$k$j0 --dataset_name bmmc_starter --split test --no_plots \
      --no_update_model_folder --refit_baselines --output_dir ev_${kind}_b$k > /dev/null 2>&1
  fi
}
for k in 0 1 2 3 4; do
  one m $k > log_eval_m_$k.txt 2>&1 &
  one mb $k > log_eval_mb_$k.txt 2>&1 &
  wait
  echo "outer fold $k scored $(date +%T)"
done
# Ensembles: ens4 = the four inner models, ens5 = ens4 + the every-cell model; every member with
# the pooled calibration (translator.ensemble gives the members the top folder's); baselines of the every-cell regime.
ens() {  # kind k
  local kind=$1 k=$2 n=n js=() members=()
  [ "$kind" = mb ] && n=nb
  for j in 0 1 2 3 4; do [ $j = $k ] && continue; js+=($j); members+=($kind$k$j); done
  [ -d ens5_${kind}_$k ] || python -m translator.ensemble --model A_${kind}_$k --members "${members[@]}" --output_dir ens5_${kind}_$k
  [ -d ens4_${kind}_$k ] || python -m translator.ensemble --model P_${kind}_a$k --members "${members[@]:1}" --output_dir ens4_${kind}_$k
  for e in ens4 ens5; do
    [ -f ev_${kind}_$e$k/eval_results.json ] || python "$REPO/eval.py" --model ${e}_${kind}_$k --dataset_dir $n$k${js[0]} --dataset_name bmmc_starter \
      --split test --no_plots --no_update_model_folder --refit_baselines --output_dir ev_${kind}_$e$k > /dev/null 2>&1
  done
}
for k in 0 1 2 3 4; do
  ens m $k > log_ens_m_$k.txt 2>&1 &
  ens mb $k > log_ens_mb_$k.txt 2>&1 &
  wait
done
# Source-kernel stack: the ensembles (model ens5, seed_binary ens4) stacked, pooled over the inner models.
stk() {  # kind k
  local kind=$1 k=$2 n=n a=a e=ens5 js=() pool=()
  if [ "$kind" = mb ]; then n=nb; a=ab; e=ens4; fi
  for j in 0 1 2 3 4; do [ $j = $k ] && continue; js+=($j); pool+=(--pool $kind$k$j $n$k$j); done
  if [ ! -f ev_${kind}_S$k/eval_results.json ]; then
    rm -rf S_${kind}_$k && cp -r ${e}_${kind}_$k S_${kind}_$k
    python -m translator.stack --model S_${kind}_$k --dataset_dir $a$k "${pool[@]}"
    python "$REPO/eval.py" --model S_${kind}_$k --dataset_dir $n$k${js[0]} --dataset_name bmmc_starter --split test --no_plots \
      --no_update_model_folder --refit_baselines --output_dir ev_${kind}_S$k > /dev/null 2>&1
  fi
}
for k in 0 1 2 3 4; do
  stk m $k > log_stack_m_$k.txt 2>&1 &
  stk mb $k > log_stack_mb_$k.txt 2>&1 &
  wait
done
python -m evaluation.crossval pool --baselines ev_m_b{0,1,2,3,4} --candidate model_ens5 ev_m_ens5{0,1,2,3,4} --candidate model_ens5_stack ev_m_S{0,1,2,3,4} \
  --candidate seed_binary_ens4 ev_mb_ens4{0,1,2,3,4} --candidate seed_binary_ens4_stack ev_mb_S{0,1,2,3,4} --output pool_stack.json
python -m evaluation.crossval pool --baselines ev_m_b{0,1,2,3,4} --candidate model_ens4 ev_m_ens4{0,1,2,3,4} --candidate model_ens5 ev_m_ens5{0,1,2,3,4} \
  --candidate seed_binary_ens4 ev_mb_ens4{0,1,2,3,4} --candidate seed_binary_ens5 ev_mb_ens5{0,1,2,3,4} --output pool_ens.json
python -m evaluation.crossval pool --baselines ev_m_a{0,1,2,3,4} --candidate model_a ev_m_a{0,1,2,3,4} \
  --candidate seed_binary_a ev_mb_a{0,1,2,3,4} --output pool_a.json
python -m evaluation.crossval pool --baselines ev_m_b{0,1,2,3,4} --candidate model_b ev_m_b{0,1,2,3,4} \
  --candidate seed_binary_b ev_mb_b{0,1,2,3,4} --output pool_b.json
