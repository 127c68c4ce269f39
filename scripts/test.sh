#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite. Extra arguments go to pytest.
# Two tests need Debian packages: the web app's browser test needs chromium, and the DICOM SEG tests check their
# output with dciodvfy (package dicom3tools). As root with apt-get the missing ones are installed here; elsewhere,
# or when one cannot be installed, the tests that need it skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v dciodvfy > /dev/null || missing+=(dicom3tools)
if [[ ${#missing[@]} -gt 0 && "$(id -u)" == 0 ]] && command -v apt-get > /dev/null; then
    apt-get update -qq || echo "apt-get update failed: installing ${missing[*]} may fail" >&2
    for package in "${missing[@]}"; do  # one at a time, so one that is unavailable does not block the other
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" > /dev/null \
            || echo "$package could not be installed: the tests that need it will skip" >&2
    done
fi
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
python -m pytest "$@"
