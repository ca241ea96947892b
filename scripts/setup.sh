#!/usr/bin/env bash
# Create .venv with Python 3.12+ and install trb_nemo with its dev extras.
# Quick when nothing changed: the install is skipped while pyproject.toml's hash matches the stamp.
# Usage: scripts/setup.sh            (PYTHON=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.trb_nemo_installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

is_ok() {  # is_ok PY: true when PY runs and is Python 3.12 or 3.13
  "$1" -c 'import sys; sys.exit(0 if (3, 12) <= sys.version_info[:2] < (3, 14) else 1)' 2>/dev/null
}

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_ok "$c" && { command -v "$c"; return; }
  done
  # pyenv installs that are not on PATH
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python; do
    [ -x "$c" ] && is_ok "$c" && { echo "$c"; return; }
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! is_ok "$venv/bin/python"; then
  py=$(find_python) || {
    echo "setup: Python 3.12 or 3.13 is required (megatron-core >= 0.17 needs it); install it or set PYTHON=/path/to/python3.12" >&2
    exit 2
  }
  echo "setup: creating $venv with $py"
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

echo "setup: installing trb_nemo[dev] into $venv (first time: several minutes, torch is large)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done"
