#!/usr/bin/env bash
# Reproduces the bundled model (dgemma/assets/model): train from scratch on the standard library with
# recipes/bundled.toml, extend seven times with warm restarts of the cosine schedule (1000 -> 2200 -> 3400 steps, then
# to 6600 supervising two canvases per sequence, then to 10000 adding the test suites to the data and corrupting 40% of
# blocks as one contiguous span, then to 16400, then to 19600, then to 23200), fine-tune that model with line-shaped
# spans and line-aligned rows (recipes/bundled_lines.toml) in three more runs and a fourth with a fresh optimiser, then
# copy the last checkpoint, without its optimiser state, into the package. (The shipped model ran steps 10000-10300 on a
# schedule to 16000, steps 10300-11400 in two data-parallel processes on schedules to 20000, then 18000, and went on
# from step 11400 as below; steps 16400-16900 ran on a schedule to 20400; the fine-tune's first 3600 steps ran on a
# schedule to 5000.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # on a small shared CPU one thread avoids OpenMP threads spinning against each other
dgemma train recipes/bundled.toml
dgemma train recipes/bundled.toml --resume --set train.steps=2200
dgemma train recipes/bundled.toml --resume --set train.steps=3400
dgemma train recipes/bundled.toml --resume --set train.steps=6600 --set train.blocks=2
dgemma train recipes/bundled.toml --resume --set train.steps=10000 --set train.blocks=2 \
    --set 'data.train=["stdlib:train"]' --set objective.span=0.4
dgemma train recipes/bundled.toml --resume --set train.steps=16400 --set train.blocks=2 \
    --set 'data.train=["stdlib:train"]' --set objective.span=0.4
dgemma train recipes/bundled.toml --resume --set train.steps=19600 --set train.blocks=2 \
    --set 'data.train=["stdlib:train"]' --set objective.span=0.4
dgemma train recipes/bundled.toml --resume --set train.steps=23200 --set train.blocks=2 \
    --set 'data.train=["stdlib:train"]' --set objective.span=0.4
# Ninth to eleventh runs (two threads): fine-tune the step-23200 model with a fresh optimiser, making half the span
# rows one whole line (recipes/bundled_lines.toml): 3600 steps, then to 7000 with half the rows line-aligned, then to
# 14000.
export OMP_NUM_THREADS=2
dgemma train recipes/bundled_lines.toml --set train.steps=3600 --set data.line_aligned=0
dgemma train recipes/bundled_lines.toml --resume
dgemma train recipes/bundled_lines.toml --resume --set train.steps=14000
# Twelfth run: the same objective and data from the step-14000 model with a fresh optimiser, a lower peak learning
# rate, a longer warm-up and another data order: 8000 steps.
dgemma train recipes/bundled_lines.toml --set model.checkpoint=runs/bundled-lines/step-014000 \
    --set train.out=runs/bundled-lines2 --set train.steps=8000 --set train.lr=4e-4 --set train.warmup=300 \
    --set train.seed=2
src="runs/bundled-lines2/$(cat runs/bundled-lines2/latest)"
dst=dgemma/assets/model
rm -rf "$dst" && mkdir -p "$dst"
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json \
    chat_template.jinja; do
    cp "$src/$f" "$dst/"
done
# Generation defaults for the bundled model: 48 steps (more than its 32-token canvas) and 128 new tokens. The chat
# template is today's (the checkpoints of resumed runs carry the one written when the first run made the tokenizer).
python - "$dst" <<'PY'
import json, sys
from pathlib import Path
from dgemma.tokenizer import BYTE_CHAT_TEMPLATE
dst = Path(sys.argv[1])
cfg = json.loads((dst / "generation_config.json").read_text())
cfg.update(max_new_tokens=128, max_denoising_steps=48)
(dst / "generation_config.json").write_text(json.dumps(cfg, indent=2))
(dst / "chat_template.jinja").write_text(BYTE_CHAT_TEMPLATE)
PY
echo "bundled model written to $dst"
