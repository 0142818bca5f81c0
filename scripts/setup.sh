#!/usr/bin/env bash
# Installs what the server and its tests need, and only what is missing:
#   - .venv at the repository root, with torch installed first and pinned from then on;
#   - the project itself (`pip install -e '.[test]'`), redone only when pyproject.toml changes;
#   - Debian packages: libopus0 (required: the Opus encoder) and chromium (optional: browser
#     tests skip without it), installed when running as root;
#   - the browser client's npm packages (web_client/node_modules).
# Safe to run again and again, with no terminal (CI=true). Options: -q/--quiet prints only
# warnings and errors; --server installs what serving needs (no chromium, which only the
# browser tests use). Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.streaming-tts-setup"
QUIET=0
SERVER_ONLY=0
APT_UPDATED=0

for arg in "$@"; do
    case "$arg" in
        -q|--quiet) QUIET=1 ;;
        --server) SERVER_ONLY=1 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown option $arg" >&2; exit 2 ;;
    esac
done

say() { [ "$QUIET" = 1 ] || echo "setup: $*" >&2; }
warn() { echo "setup: WARNING: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# Runs a command; when quiet, its output is kept back and shown only if it fails.
run() {
    if [ "$QUIET" = 0 ]; then
        "$@" >&2 && return 0
        die "failed: $*"
    fi
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        die "failed: $*"
    fi
    rm -f "$log"
}

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {  # apt_install PACKAGE...: as root, with one `apt-get update` per run
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        run apt-get update -q
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    run apt-get install -y -q --no-install-recommends "$@"
}

have_libopus() {
    "$PYTHON" -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("opus") is None)'
}

ensure_libopus() {
    have_libopus && return 0
    if is_root && command -v apt-get >/dev/null; then
        apt_install libopus0
        have_libopus || die "libopus0 was installed but libopus still cannot be found"
    else
        die "the Debian package libopus0 (libopus.so.0) is required for Opus audio;" \
            "install it as root: apt-get install libopus0"
    fi
}

ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    if is_root && command -v apt-get >/dev/null; then
        # In a subshell: a failed install of this optional package must not end the setup.
        (apt_install chromium) || warn "could not install chromium; browser tests will be skipped"
    else
        warn "the Debian package chromium is not installed (browser tests will be skipped);" \
             "install it as root: apt-get install chromium"
    fi
}

ensure_python() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.10 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$("$PYTHON" --version 2>&1) is too old; Python 3.10 or newer is needed"
}

ensure_venv() {
    if [ -x "$PY" ] && "$PY" -c 'import sys' 2>/dev/null; then
        return 0
    fi
    say "creating $VENV"
    run "$PYTHON" -m venv --clear "$VENV"
}

installed_version() {  # installed_version DIST: prints the version, fails when absent
    "$PY" - "$1" <<'EOF' 2>/dev/null
import importlib.metadata, sys
print(importlib.metadata.version(sys.argv[1]))
EOF
}

ensure_torch() {
    # Reading the installed metadata is instant; importing torch would take seconds.
    installed_version torch >/dev/null && return 0
    say "installing torch==$TORCH_VERSION (PyPI gives the CUDA build where one exists)"
    run "$PY" -m pip install -q "torch==$TORCH_VERSION"
}

setup_key() {  # what the editable install depends on: pyproject.toml, Python and torch
    {
        cat "$ROOT/pyproject.toml"
        "$PY" -c 'import sys; print(sys.version)'
        installed_version torch
    } | sha256sum | cut -d' ' -f1
}

ensure_project() {
    local key constraint
    key="$(setup_key)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
        && installed_version streaming-tts >/dev/null; then
        return 0
    fi
    # Pin torch to what is installed, so no dependency can swap in another build.
    constraint="$VENV/torch-constraint.txt"
    echo "torch==$(installed_version torch)" >"$constraint"
    say "installing the project and its test dependencies (pip install -e '.[test]')"
    run "$PY" -m pip install -q -c "$constraint" -e "${ROOT}[test]"
    echo "$key" >"$STAMP"
}

ensure_web_client() {
    local dir="$ROOT/web_client" key stamp
    [ -f "$dir/package.json" ] || return 0
    if ! command -v npm >/dev/null; then
        warn "npm not found: the browser client's packages are not installed" \
             "(browser tests will be skipped); install Node.js and npm"
        return 0
    fi
    key="$(cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    stamp="$dir/node_modules/.streaming-tts-setup"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        return 0
    fi
    local cmd=(npm install --no-audit --no-fund)
    [ -f "$dir/package-lock.json" ] && cmd=(npm ci --no-audit --no-fund)
    say "installing the browser client's packages (${cmd[*]})"
    (cd "$dir" && export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 && run "${cmd[@]}")
    echo "$key" >"$stamp"
}

main() {
    ensure_python
    ensure_libopus
    [ "$SERVER_ONLY" = 1 ] || ensure_chromium
    ensure_venv
    ensure_torch
    ensure_project
    ensure_web_client
    say "ready: $VENV"
}

main
