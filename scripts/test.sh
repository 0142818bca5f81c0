#!/usr/bin/env bash
# Runs the whole test suite (arguments go to pytest), installing whatever is missing first.
# Tests marked `cuda` skip without a GPU; `browser` tests skip without Chromium.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
    # pytest's 5 means no test was collected: a suite that checks nothing is a failure.
    echo "test: ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
