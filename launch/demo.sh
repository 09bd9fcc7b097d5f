#!/usr/bin/env bash
# The main job on data it generates, from a fresh machine: sets up ./.venv from the lock files,
# then generates synthetic grounded scenes, builds them with the real TFDS builders, trains a
# small PixelLLM on every task at once (pixelllm.main), evaluates it on the held-out scenes with
# the paper's evaluators and draws the results (pixelllm/tools/demo.py). Flags go to it:
#   bash launch/demo.sh                 # about 20 minutes on 2 CPU cores; writes demo_out/
#   bash launch/demo.sh --quick         # a few steps: every file, no meaningful numbers
#   bash launch/demo.sh --out=runs/demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pixelllm.tools.demo "$@"
