#!/usr/bin/env bash
# Creates ./.venv (once) and installs the exact pins of requirements*.lock plus this package.
# Re-running is cheap: installation is skipped while the lock files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pixelllm-lock-$(cat requirements.lock requirements-nodeps.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.lock
  # timm and segment-anything declare torchvision, which cannot import beside the CPU torch wheel.
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.pixelllm-lock-*
  touch "$stamp"
fi
