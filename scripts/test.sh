#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite. Extra arguments go to pytest.
# The web app's browser test needs Debian's chromium; as root with apt-get it is installed here, elsewhere
# that one test skips with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/chromium && "$(id -u)" == 0 ]] && command -v apt-get > /dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null) \
        || echo "chromium could not be installed: the browser test will skip" >&2
fi
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
python -m pytest "$@"
