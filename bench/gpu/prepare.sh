#!/usr/bin/env bash
# Stage what bench/gpu/t5small_mop.sh and bench/gpu/speed.sh need on a lent GPU machine, which reaches no package
# registry: wheels of the packages its image lacks (cp312, manylinux x86-64), the built MOp dataset and its tokenizer,
# and (for speed.sh's prediction part) the feature names of a dataset built from bench/make_large.py's file.
# Run here, from the repository root, in the environment the test suite uses:
#   bash bench/gpu/prepare.sh --build            # builds the three folders below under /tmp/gpu, then stages (about a minute)
#   bash bench/gpu/prepare.sh DATASET_DIR TOKENIZER_DIR [LARGE_DATASET_DIR]   # stages folders built beforehand
# --build runs (MOp from ../shared/data, with docs/results.md's splits and every peak):
#   python -m dataset_builder --input ../shared/data/mop_snareseq/mop_snare.h5mu --output_dir /tmp/gpu/mop \
#       --test_batches 09G 09H --validation_batches 09I
#   python -m tokenizer --dataset /tmp/gpu/mop --output_dir /tmp/gpu/mop_tok
#   python bench/make_large.py --n_cells 20000 --no_x --output /tmp/gpu/large20k.h5ad
#   python -m dataset_builder --input /tmp/gpu/large20k.h5ad --output_dir /tmp/gpu/large --test_batches s4d1 s4d8 s4d9 \
#       --validation_batches s3d7
# Writes .gpu/ (ignored by .gitignore) and prints its size; the device tool carries at most 64 MiB.
# make_large.py's feature names depend only on its seed, so the names staged fit the file speed.sh writes there.
set -euo pipefail
USAGE="usage: prepare.sh --build [STAGE_DIR] | prepare.sh DATASET_DIR TOKENIZER_DIR [LARGE_DATASET_DIR]"
if [ "${1:-}" = --build ]; then
  STAGE=${2:-/tmp/gpu}
  MOP_H5MU=${MOP_H5MU:-../shared/data/mop_snareseq/mop_snare.h5mu}
  [ -f "$MOP_H5MU" ] || { echo "prepare.sh: $MOP_H5MU is missing; lay ../shared beside the repository or set MOP_H5MU" >&2; exit 2; }
  mkdir -p "$STAGE"
  python3 -m dataset_builder --input "$MOP_H5MU" --output_dir "$STAGE/mop" --test_batches 09G 09H --validation_batches 09I --overwrite_output_dir
  python3 -m tokenizer --dataset "$STAGE/mop" --output_dir "$STAGE/mop_tok" --overwrite_output_dir
  python3 bench/make_large.py --n_cells 20000 --no_x --output "$STAGE/large20k.h5ad"
  python3 -m dataset_builder --input "$STAGE/large20k.h5ad" --output_dir "$STAGE/large" --test_batches s4d1 s4d8 s4d9 \
    --validation_batches s3d7 --overwrite_output_dir
  set -- "$STAGE/mop" "$STAGE/mop_tok" "$STAGE/large"
fi
DATA=${1:?$USAGE}
TOK=${2:?$USAGE}
LARGE=${3:-}
for d in "$DATA" "$TOK" ${LARGE:+"$LARGE"}; do [ -d "$d" ] || { echo "prepare.sh: $d is not a folder; build it first (the commands above)" >&2; exit 2; }; done
rm -rf .gpu.partial && mkdir -p .gpu.partial/whl
# The image holds torch, accelerate, tokenizers, huggingface-hub, pandas, pyarrow, scipy, scikit-learn, h5py, matplotlib
# (KINDS.md); these are missing or older there (regex and fsspec pinned: transformers and datasets check them at import).
# The versions a device run has used (docs/results/gpu/); transformers stays at 5.24.0 because 5.25 needs huggingface-hub
# 2.4 or newer and the image holds 1.33.0 (its T5 has SDPA attention too).
PKGS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6 transformers==5.24.0 anndata==0.12.19 mudata==0.3.10
array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 session-info2==0.4.1 zarr==3.1.6
numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 regex==2026.11.19 fsspec==2026.9.0"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu.partial/whl $PKGS
# the Arrow records compress ~3x (37 MB -> 12 MB for mop10k with its tokenizer)
mkdir -p .gpu.partial/stage && cp -r "$DATA" .gpu.partial/stage/mop && cp -r "$TOK" .gpu.partial/stage/mop_tok
PARTS="mop mop_tok"
if [ -n "$LARGE" ]; then  # only the names: bench_predict.py --write_timing_model reads the folder's cell_sentences.json
  mkdir -p .gpu.partial/stage/large && cp "$LARGE/cell_sentences.json" .gpu.partial/stage/large/ && PARTS="$PARTS large"
fi
tar czf .gpu.partial/data.tgz -C .gpu.partial/stage $PARTS && rm -rf .gpu.partial/stage
rm -rf .gpu && mv .gpu.partial .gpu
du -sh .gpu/whl .gpu/data.tgz && du -sh .gpu
