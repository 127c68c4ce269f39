#!/usr/bin/env bash
# Creates .venv (unless a virtual environment is already active) and installs the package with its test tools.
# torch is installed first and pinned, so pip takes the CPU build instead of resolving a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${BRAINSEG_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[dev]"
