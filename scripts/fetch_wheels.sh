#!/usr/bin/env bash
# Download the wheels `scripts/gpu_check.sh` installs on a GPU machine that has CUDA PyTorch but
# no internet: everything the check imports that a bare machine (a pip-installed CUDA torch and
# what pip brings with it) lacks. Run it where the package index is reachable, then copy DIR
# along with the repository. 41 MB for x86_64 (20 wheels); nothing here replaces torch.
#
# Usage: scripts/fetch_wheels.sh [DIR]        (make wheels WHEELS=DIR; default: wheels)
#   PYTHON=             the Python whose pip downloads (default: .venv/bin/python, python3)
#   ARCH="x86_64"       the Linux architectures, space-separated: ARCH="x86_64 aarch64" adds
#                       GH200 / Grace machines (38 MB more)
#   WITH_TRANSFORMERS=1 also transformers and the 27 packages it needs (36 MB more for x86_64,
#                       52 MB for both). Optional: the check's tests, toy run and benchmarks do
#                       not import it (only HF tokenizers and `benchmarks/rollout.py --parts d`)
#
# DIR gets the wheels and two lists (name==version, what gpu_check.sh installs, --no-deps):
#   requirements.txt  always installed (ahead of the image's own copies): Megatron-Core, Hydra,
#                     math-verify, pytest, ... as the project pins them
#   if-missing.txt    each installed only where the interpreter has no such distribution, so an
#                     image's own numpy (and the extensions built against it) stays in charge:
#                     numpy, PyYAML, safetensors (+ transformers' set with WITH_TRANSFORMERS=1)
# Compiled wheels come for each CPython the project supports (3.12, 3.13: megatron-core >= 0.17
# needs 3.12): megatron-core, numpy and PyYAML one per CPython, psutil and safetensors abi3.
# Pure-Python packages come as py3-none-any wheels (built here when PyPI has only an sdist).
# Never included: torch and its own dependencies (triton, sympy, the nvidia-* libraries),
# tensorboard, matplotlib, transformer-engine. gpu_check.sh checks each import and names what
# is missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-wheels}
read -r -a arches <<< "${ARCH:-x86_64}"
[ "${#arches[@]}" -gt 0 ] || { echo "fetch_wheels: ARCH is empty" >&2; exit 2; }
with_transformers=${WITH_TRANSFORMERS:-0}
pythons=(3.12 3.13)
# 48 MB per architecture (41 MB today), 40 MB more per architecture with transformers
max_bytes=$(( ${#arches[@]} * (48000000 + (with_transformers == 1 ? 40000000 : 0)) ))

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
  py="$repo/.venv/bin/python"
else
  py=python3
fi
"$py" -m pip --version >/dev/null 2>&1 || {
  echo "fetch_wheels: '$py -m pip' does not run; set PYTHON= to a Python with pip" >&2
  exit 2
}

# Versions inside pyproject.toml's ranges; bump them together with it.
MEGATRON=megatron-core==0.19.2    # compiled: one wheel per CPython and architecture
PSUTIL=psutil==7.2.2              # megatron-core's dist_checkpointing save hangs without it
PURE=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3   # hydra/omegaconf pin 4.9.*; PyPI has only its sdist
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  tqdm==4.70.1
  packaging==26.4                 # megatron-core needs >= 24.2, older images have less
  pytest==9.2.0
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
  pytest-timeout==2.4.0
)
# A bare CUDA torch lacks these (torch does not depend on them); images that have them keep theirs.
PER_PYTHON=(numpy==2.5.5 PyYAML==6.0.4)   # compiled per CPython
ABI3=(safetensors==0.8.0)
TRANSFORMERS=transformers==5.25.0

mkdir -p "$dir"
rm -f "$dir"/*.whl "$dir/requirements.txt" "$dir/if-missing.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_q=("$py" -m pip --disable-pip-version-check -q)
platforms() {  # the manylinux tags a wheel for architecture $1 may carry
  printf -- '--platform\n%s\n' "manylinux_2_28_$1" "manylinux_2_27_$1" "manylinux_2_24_$1" \
    "manylinux2014_$1" "manylinux_2_17_$1"
}

echo "fetch_wheels: downloading into $dir (${arches[*]}; CPython ${pythons[*]})"
for arch in "${arches[@]}"; do
  mapfile -t plat < <(platforms "$arch")
  for v in "${pythons[@]}"; do
    "${pip_q[@]}" download --no-deps --only-binary=:all: --python-version "$v" \
      --implementation cp "${plat[@]}" -d "$dir" "$MEGATRON" "${PER_PYTHON[@]}"
  done
  "${pip_q[@]}" download --no-deps --only-binary=:all: --python-version "${pythons[0]}" \
    --implementation cp "${plat[@]}" -d "$dir" "$PSUTIL" "${ABI3[@]}"
done
# `pip wheel` keeps a published wheel as it is and builds one from an sdist (antlr4 4.9.3)
"${pip_q[@]}" wheel --no-deps --prefer-binary -w "$dir" "${PURE[@]}"

printf '%s\n' "$MEGATRON" "$PSUTIL" "${PURE[@]}" > "$dir/requirements.txt"
printf '%s\n' "${PER_PYTHON[@]}" "${ABI3[@]}" > "$dir/if-missing.txt"

if [ "$with_transformers" = 1 ]; then
  # transformers with everything it needs, resolved for each target; versions we ship already
  # are held to ours (-c), and those wheels are not added twice
  cat "$dir/requirements.txt" "$dir/if-missing.txt" > "$tmp/pins.txt"
  for arch in "${arches[@]}"; do
    mapfile -t plat < <(platforms "$arch")
    for v in "${pythons[@]}"; do
      "${pip_q[@]}" download --only-binary=:all: --python-version "$v" --implementation cp \
        "${plat[@]}" -c "$tmp/pins.txt" -d "$tmp/tf" "$TRANSFORMERS"
    done
  done
  "$py" - "$tmp/tf" "$dir" "$tmp/pins.txt" >> "$dir/if-missing.txt" <<'EOF'
import re, shutil, sys
from pathlib import Path
src, dest, pins = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
shipped = {norm(line.split("==")[0]) for line in pins.read_text().split()}
versions = {}
for w in sorted(src.glob("*.whl")):
    name, version = w.name.split("-")[:2]
    if norm(name) in shipped:
        continue
    if norm(name) in ("torch", "triton") or norm(name).startswith(("nvidia-", "cuda-")):
        sys.exit(f"fetch_wheels: transformers pulled in {w.name}; torch's packages stay out")
    versions.setdefault(norm(name), set()).add(version)
    shutil.move(w, dest / w.name)
for name, vs in sorted(versions.items()):
    if len(vs) > 1:
        sys.exit(f"fetch_wheels: {name} resolved to {sorted(vs)} across the targets")
    print(f"{name}=={vs.pop()}")
EOF
fi

for w in "$dir"/*.whl; do
  case "$(basename "$w")" in
    torch-* | triton-* | nvidia_* | cuda_*)
      echo "fetch_wheels: $(basename "$w") is torch's; it must not be shipped" >&2; exit 1 ;;
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-abi3-manylinux*.whl) ;;
    *-cp312-cp312-manylinux*.whl | *-cp313-cp313-manylinux*.whl) ;;
    *) echo "fetch_wheels: unexpected wheel $(basename "$w")" >&2; exit 1 ;;
  esac
done

files=("$dir"/*.whl)
total=$(cat "${files[@]}" | wc -c)
for w in "${files[@]}"; do
  printf '  %9d  %s\n' "$(wc -c < "$w")" "$(basename "$w")"
done
echo "fetch_wheels: ${#files[@]} wheels, $total bytes in $dir" \
     "($(grep -c . "$dir/requirements.txt") always installed, $(grep -c . "$dir/if-missing.txt") where missing)"
if [ "$total" -ge "$max_bytes" ]; then
  echo "fetch_wheels: $total bytes is over the $max_bytes-byte limit" >&2
  exit 1
fi
