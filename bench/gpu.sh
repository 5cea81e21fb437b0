#!/usr/bin/env bash
# The GPU checks and the 26b-a4b benchmark on one CUDA GPU (sized for an 80 GB H100: 47 GiB of bf16 weights, shared
# with the reference). In order, each under its own `timeout`, the whole script under 8 minutes:
#   1. tests/test_cuda.py: bf16 logits against transformers' on the same GPU, CUDA graph replays against eager passes,
#      the grouped experts, the compiled Triton kernels and quantized networks (figures in logs.txt);
#      then bench/experts.py: one layer's expert products, torch._grouped_mm against the Triton kernel;
#   2. random weights, bf16, 16 fixed steps, batch 1 and 4: ours and transformers' reference on the same weight tensors;
#   3. int4 (group 64) and int8 quantized from the same weights, batch 1;
#   4. batch 1 against autoregressive decoding of the same weights;
#   5. ours at batch 8 (peak memory);
#   6. ours at batch 1 without CUDA graphs (DGEMMA_CUDA_GRAPHS=0), to show what the graphs are worth.
# It installs nothing, except wheels found in $WHEELS (default: .whl in this checkout) into a temporary folder when
# the active Python lacks transformers 5.23.0.
#
#   OUT=DIR bash bench/gpu.sh    # tables.txt, logs.txt, JSON and PNG go to $OUT (default: a new temporary folder)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d -t dgemma-bench.XXXXXX)}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
SHAPE="${SHAPE:-26b-a4b}" DEVICE="${DEVICE:-cuda}"  # SHAPE=tiny DEVICE=cpu: a dry run of the script itself
BASE_PATH="${PYTHONPATH:-}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${BASE_PATH:+:$BASE_PATH}"  # this checkout's code, the env's dependencies
export PYTHONUNBUFFERED=1

# Prints torch's and transformers' versions; fails (saying why) unless transformers is 5.23.0, the reference.
CHECK="import dgemma, torch, transformers as t; print('torch', torch.__version__, 'transformers', t.__version__)
assert t.__version__ == '5.23.0', 'the reference needs transformers 5.23.0'"
has_reference() { timeout 30 "$PYTHON" -c "$CHECK" 2>&1 | tail -n 2; }
if ! has_reference; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        SITE="$(mktemp -d -t dgemma-site.XXXXXX)"
        timeout 15 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
            && export PYTHONPATH="$ROOT:$SITE${BASE_PATH:+:$BASE_PATH}"  # the wheels before the env's own packages
    fi
fi
COMPARE=(--compare reference)
if ! has_reference; then  # everything else still runs: our numbers need no reference
    echo "gpu.sh: no transformers 5.23.0 (put its wheel in WHEELS): the reference rows and parity tests are left out"
    COMPARE=()
fi

timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
LOG="$OUT/logs.txt"

# Time limits: 60 (versions) + 15 (wheels) + 5 (nvidia-smi) + 80 + 25 + 80 + 70 + 75 + 45 + 35 + 40 = 530 s at
# most; the checks take a few seconds each, so about 7 minutes in practice.
# pyproject's -q already; -rfEs names each failed, erroring and skipped test in the summary.
timeout 80 "$PYTHON" -m pytest "$ROOT/tests/test_cuda.py" -s -rfEs -p no:cacheprovider >> "$LOG" 2>&1
tests=$?
echo "==== GPU tests (exit $tests) ===="
grep -iE "max rel err|cosine|passed|failed|skipped|error" "$LOG" | tail -n 25
{ echo "==== experts ===="; TRITON_INTERPRET=$([ "$DEVICE" = cpu ] && echo 1 || echo 0) timeout 25 "$PYTHON" \
    "$ROOT/bench/experts.py" --shape "$SHAPE" --device "$DEVICE" 2>> "$LOG"; } | tee -a "$OUT/tables.txt"

# bench NAME SECONDS ARGS...: one `dgemma bench` run; its table is printed and appended to tables.txt.
bench() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" -m dgemma bench --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --prompt-len 64 \
        "$@" --json-out "$OUT/bench-$name.json" > "$OUT/table-$name.txt" 2>> "$LOG"
    local code=$?
    { echo "==== $name (exit $code) ===="; cat "$OUT/table-$name.txt"; } | tee -a "$OUT/tables.txt"
    rm -f "$OUT/table-$name.txt"
    status=$(( status | code ))
}
status=0
bench reference 80 --steps 16 --batch 1 4 "${COMPARE[@]}" --repeat 2 --warmup 1 --png "$OUT/bench.png"
# int8 is made from the bf16 copy (its peak includes them: ~71 GiB), then int4 in their place, so int4's peak is
# what an int4 model holds.
bench quant 70 --steps 16 --batch 1 --quant int8 int4 --repeat 1 --warmup 1
bench ar 75 --steps 16 --batch 1 --compare ar --repeat 1 --warmup 1
bench batch8 45 --steps 16 --batch 8 --repeat 1 --warmup 1
# Four canvases: their growing cache shares one length bucket, so graphs captured for the first serve all four.
bench canvases 35 --steps 16 --batch 1 --new-tokens 1024 --repeat 1 --warmup 1
DGEMMA_CUDA_GRAPHS=0 bench eager 40 --steps 16 --batch 1 --repeat 1 --warmup 1
exit $(( status | tests ))
