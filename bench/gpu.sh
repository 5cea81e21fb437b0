#!/usr/bin/env bash
# The 26b-a4b benchmark on one CUDA GPU (sized for an H100: 47 GiB of bf16 weights, shared with the reference):
# random weights, bf16, 16 fixed steps, batch 1 and 4, ours against transformers' reference and against
# autoregressive decoding; then int4 (group 64) and int8 quantized from the same weights at batch 1; one table each.
# Every step runs under `timeout`; the whole script stays under 8 minutes. It installs nothing, except dgemma from wheels in $WHEELS when the active Python lacks it.
#
#   OUT=DIR bash bench/gpu.sh    # table, JSON, PNG and logs go to $OUT (default: a new temporary folder)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d -t dgemma-bench.XXXXXX)}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, the env's dependencies

if ! "$PYTHON" -c "import dgemma, transformers" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        timeout 50 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || exit 2
    else
        echo "gpu.sh: dgemma and transformers must be importable (or set WHEELS to a folder of wheels)" >&2
        exit 2
    fi
fi

timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Time limits: 50 (wheels) + 15 + 270 + 60 (fallback) + 80 (quantized) = 475 s at most.
COMMON=(--shape 26b-a4b --device cuda --dtype bfloat16 --batch 1 4 --prompt-len 64 --steps 16)

# Ours, transformers' reference on the same weight tensors, and autoregressive decoding (the bulk of the budget).
timeout 270 "$PYTHON" -m dgemma bench "${COMMON[@]}" --compare reference ar --repeat 2 --warmup 1 \
    --json-out "$OUT/bench-26b.json" --png "$OUT/bench-26b.png" > "$OUT/table.txt" 2> "$OUT/bench.log"
status=$?
if [ $status -ne 0 ]; then
    echo "gpu.sh: the full comparison stopped (exit $status); its finished rows are in $OUT/bench.log:" >&2
    grep "tok/s" "$OUT/bench.log" >&2
    tail -n 5 "$OUT/bench.log" >&2
    # Ours alone still gives a table.
    timeout 60 "$PYTHON" -m dgemma bench "${COMMON[@]}" --repeat 1 --warmup 1 \
        --json-out "$OUT/bench-26b-ours.json" > "$OUT/table.txt" 2> "$OUT/bench-ours.log"
    status=$?
fi

# Quantized formats (int4 is made from the bf16 copy, int8 in its place, so the peak is bf16 + int4: ~61 GiB).
timeout 80 "$PYTHON" -m dgemma bench --shape 26b-a4b --device cuda --dtype bfloat16 --batch 1 --prompt-len 64 \
    --steps 16 --quant int4 int8 --repeat 1 --warmup 1 --json-out "$OUT/bench-26b-quant.json" \
    > "$OUT/table-quant.txt" 2> "$OUT/bench-quant.log" || echo "gpu.sh: the quantized run stopped (exit $?)" >&2

echo "==== summary (files in $OUT) ===="
cat "$OUT/table.txt"
echo "==== quantized ===="
cat "$OUT/table-quant.txt"
exit $status
