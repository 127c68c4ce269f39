#!/usr/bin/env bash
# Creates .venv (unless a virtual environment is already active) and installs the package with its test tools.
# torch is installed first and pinned, so pip takes the CPU build instead of resolving a multi-GB CUDA one.
# Run again, it does nothing while setup.cfg, pyproject.toml and the torch pin are those it last installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
torch_version="${BRAINSEG_TORCH_VERSION:-2.13.0}"
stamp="$VIRTUAL_ENV/.brainseg-monai-installed"
wanted="torch==$torch_version $(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) $PWD"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && python -c "import brainseg_monai" 2> /dev/null; then
    exit 0
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==$torch_version"
# setuptools warns on every editable install that a folder named like the package could shadow it: not so here.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install --quiet -e ".[dev]"
echo "$wanted" > "$stamp"
