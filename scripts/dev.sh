#!/usr/bin/env bash
# Installs bianzhi into ./.venv and runs it or its tests. Used by the Makefile and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

install() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bianzhi needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
    exit 2
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.installed" want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing bianzhi and its dependencies into $VENV ..." >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The versions CI tested (constraints.txt), within the ranges of pyproject.toml.
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[dev]'
    echo "$want" > "$stamp"
  fi
}

# Resolve the newest versions pyproject.toml allows, in a scratch environment, and write them
# to constraints.txt (its comment header kept). Test before committing the new file.
lock() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
  "$tmp/venv/bin/python" -m pip install --quiet -e '.[dev]'
  {
    grep '^#' constraints.txt || true
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -iv '^bianzhi=='
  } > "$tmp/constraints.txt"
  mv "$tmp/constraints.txt" constraints.txt
  echo "constraints.txt rewritten; run make test before committing it" >&2
}

cmd=${1:-}
shift || true
case "$cmd" in
  install)
    install
    ;;
  lock)
    lock
    ;;
  up)
    install
    exec "$VENV/bin/bianzhi" up "$@"
    ;;
  test)
    install
    echo "== ruff" >&2
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    echo "== message schemas" >&2
    "$VENV/bin/python" -m contracts.schemas --check
    if [ -n "${BIANZHI_TEST_POSTGRES_URL:-}" ]; then
      echo "databases: SQLite and PostgreSQL ($BIANZHI_TEST_POSTGRES_URL)" >&2
    else
      echo "databases: SQLite ONLY (set BIANZHI_TEST_POSTGRES_URL to include PostgreSQL)" >&2
    fi
    # Worker processes (pytest-xdist), a test file each at a time: most tests wait on a broker,
    # a database or a service process, so two workers on a two-core machine take about 60 % of
    # the time one does (1,758 tests: 17 min 23 s against 29 min 15 s, 2026-11-27).
    # BIANZHI_TEST_WORKERS=0 runs them in this process.
    workers=${BIANZHI_TEST_WORKERS:-2}
    echo "== tests ($workers workers)" >&2
    if [ "$workers" = 0 ]; then
      exec "$VENV/bin/python" -m pytest "$@"
    fi
    exec "$VENV/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
    ;;
  bench)
    install
    exec "$VENV/bin/python" bench/orgs_throughput.py "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh install|lock|up|test|bench [args...]" >&2
    exit 2
    ;;
esac
