#!/usr/bin/env bash
# Download the wheels `scripts/gpu_check.sh` installs on a GPU machine that has CUDA PyTorch but
# no internet: the project's dependencies such an image usually lacks (Megatron-Core, Hydra,
# math-verify, pytest, ...). Run it where the package index is reachable, then copy DIR along
# with the repository. Under 10 MB in all; nothing here replaces the image's torch.
#
# Usage: scripts/fetch_wheels.sh [DIR]        (default: wheels; PYTHON= chooses the pip to use)
#
# DIR gets the wheels and requirements.txt (name==version of each, what gpu_check.sh installs).
# Pure-Python packages come as py3-none-any wheels (built here when PyPI has only an sdist);
# megatron-core and psutil have compiled parts: one megatron-core wheel per CPython the project
# supports (3.12, 3.13: megatron-core >= 0.17 requires 3.12) and psutil's abi3 wheel, for
# Linux on $ARCH (x86_64 unless set, e.g. ARCH=aarch64 for GH200).
# Not included, because a CUDA PyTorch image has them (torch, transformers or Triton need them)
# or they are too large: torch, numpy, sympy, PyYAML, safetensors, transformers, tensorboard,
# matplotlib, transformer-engine. gpu_check.sh checks each import and says what is missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-wheels}
arch=${ARCH:-x86_64}
max_bytes=10000000

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
MEGATRON=megatron-core==0.19.2
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
PSUTIL=psutil==7.2.2             # megatron-core's dist_checkpointing save hangs without it

mkdir -p "$dir"
rm -f "$dir"/*.whl "$dir/requirements.txt"
pip_q=("$py" -m pip --disable-pip-version-check -q)
platforms=(--platform "manylinux_2_28_$arch" --platform "manylinux_2_24_$arch"
           --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch")

echo "fetch_wheels: downloading into $dir"
for v in 3.12 3.13; do
  "${pip_q[@]}" download --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp "${platforms[@]}" -d "$dir" "$MEGATRON"
done
"${pip_q[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "$PSUTIL"
# `pip wheel` keeps a published wheel as it is and builds one from an sdist (antlr4 4.9.3)
"${pip_q[@]}" wheel --no-deps --prefer-binary -w "$dir" "${PURE[@]}"

for w in "$dir"/*.whl; do
  case "$(basename "$w")" in
    megatron_core-*-cp31[23]-*.whl | psutil-*-abi3-*.whl | *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
    *) echo "fetch_wheels: unexpected wheel $(basename "$w") (not pure Python)" >&2; exit 1 ;;
  esac
done
printf '%s\n' "$MEGATRON" "$PSUTIL" "${PURE[@]}" > "$dir/requirements.txt"

files=("$dir"/*.whl)
total=$(cat "${files[@]}" | wc -c)
for w in "${files[@]}"; do
  printf '  %8d  %s\n' "$(wc -c < "$w")" "$(basename "$w")"
done
echo "fetch_wheels: ${#files[@]} wheels, $total bytes in $dir"
if [ "$total" -ge "$max_bytes" ]; then
  echo "fetch_wheels: $total bytes is over the $max_bytes-byte limit" >&2
  exit 1
fi
