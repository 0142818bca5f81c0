#!/usr/bin/env bash
# Runs the server on the default voice, installing whatever is missing first.
# Arguments go to run_server.py (try --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh --quiet --server
exec .venv/bin/python run_server.py "$@"
