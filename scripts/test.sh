#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
python -m pytest "$@"
