# Sourced by speed.sh and t5small_mop.sh: the offline environment, the inputs prepare.sh staged under GPU_DIR checked, and
# the wheels carried with them installed into /tmp/site (not with SMOKE=1, which runs in the test suite's environment).
# Expects GPU_DIR and SCRIPT (the caller's name, for the error message); exits 2 without data.tgz, 3 if the wheels fail.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$GPU_DIR/data.tgz" ] || { echo "$SCRIPT: $GPU_DIR/data.tgz is missing; run bench/gpu/prepare.sh here first and carry .gpu" >&2; exit 2; }
if ls "$GPU_DIR"/whl/*.whl > /dev/null 2>&1 && [ "${SMOKE:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
