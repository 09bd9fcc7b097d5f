#!/usr/bin/env bash
# The main job on data it generates, from a fresh machine: sets up ./.venv from the lock files, then
# runs the demo. Until the PixelLLM model lands this is the encoders demo (SAM box-prompted
# segmentation + EVA02 on a generated scene); flags go to it, e.g.
#   bash launch/demo.sh --sam_checkpoint=/path/to/sam_vit_b_01ec64.pth --sam_config=vit_b
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pixelllm.tools.encoders_demo "$@"
