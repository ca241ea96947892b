#!/usr/bin/env bash
# One command for a bare single-GPU Linux machine with CUDA PyTorch and no internet: install the
# wheels of scripts/fetch_wheels.sh into a private folder for the interpreter given (the image's
# torch is never touched), then run five stages, most important first, each under its own cap
# and all of them even when one fails:
#   1. gpu_tests      tests/gpu (every test_*.py there, new ones included), the files that use
#                     Transformer Engine / FP8 first, then the kernel (Triton, fused) ones
#   2. ops_bench      benchmarks/ops.py: the op kernels, eager and fused
#   3. train          a 5-step toy `trb-nemo train` on the GPU (TP=1, 3 TRB warmup steps)
#   4. rollout_bench  benchmarks/rollout.py with the toy models
#   5. decode_bench   benchmarks/decode_step.py: host syncs and launches per decode step, and
#                     tok/s at batch 32 with 1k and 4k context, CUDA graphs against eager
# The caps are shares of GPU_CHECK_BUDGET_S (default 450 s): 40%, 10%, 20%, 10% and 10% (180,
# 45, 90, 45 and 45 s), 90% in all; the rest is the margin for a timed-out stage's 20 s grace and the
# processes' start. A stage gets its cap or what is left of the budget, whichever is less, and is
# skipped for time under 20 s. The whole check takes under 8 minutes on one H100/H200.
#
# Usage: scripts/gpu_check.sh [--install-only] [WHEELS] [OUT]   (make gpu-check WHEELS=... OUT=...)
#   WHEELS  folder made by scripts/fetch_wheels.sh (default: wheels): requirements.txt is
#           installed, if-missing.txt only where the interpreter lacks the distribution (numpy,
#           PyYAML, safetensors: an image's own copies stay); when it is absent the image's own
#           packages are used as they are
#   OUT     gets gpu_check.log (everything), summary.json (per stage in order: status (passed,
#           failed, timed out, skipped for time, not run, interrupted), rc, seconds, cap, key
#           numbers; the GPU, torch, Transformer Engine), site/ (the installed wheels) and
#           train/ (the toy run) (default: gpu-check-out)
#   PYTHON  the interpreter with CUDA torch (default: python3); Python 3.12 or 3.13
#   --install-only (or GPU_CHECK_INSTALL_ONLY=1): skip the CUDA check, install the wheels, check
#           the imports, write summary.json (every stage "not run") and stop: the install step
#           alone, which runs on a CPU (tests/unit/test_gpu_check.py runs it in a torch-only venv)
#
# Exit codes: 0 every stage passed; 1 a stage failed, timed out or was skipped for time; 2 nothing
# could run (no CUDA device, no torch, wrong Python, a required package missing): one line on
# stderr. Transformer Engine is optional: when the image has it the TE/FP8 tests run too;
# transformers is optional too (only HF tokenizers import it, not the toy task).
# Extra arguments (split on spaces): GPU_CHECK_TRAIN_ARGS (overrides of the toy run),
# GPU_CHECK_OPS_ARGS (instead of --repeats 3), GPU_CHECK_ROLLOUT_ARGS, GPU_CHECK_DECODE_ARGS.
# Testing this script without a GPU: GPU_CHECK_SKIP_CUDA_CHECK=1 runs every stage anyway (on a
# CPU with GPU_CHECK_TRAIN_ARGS=parallel.backend=gloo and small GPU_CHECK_OPS_ARGS /
# GPU_CHECK_ROLLOUT_ARGS: the script's plumbing is what is tested).
set -uo pipefail

install_only=${GPU_CHECK_INSTALL_ONLY:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --install-only) install_only=1; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
here=$(pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$here/$1" ;; esac; }
wheels=$(abs "${1:-wheels}")
out=$(abs "${2:-gpu-check-out}")
py=${PYTHON:-python3}
case "$py" in */*) py=$(abs "$py") ;; esac
skip_cuda=${GPU_CHECK_SKIP_CUDA_CHECK:-$install_only}

fail2() { echo "gpu-check: $*" >&2; exit 2; }

# ------------------------------------------------ first: can this machine run it at all?
command -v "$py" >/dev/null 2>&1 || fail2 "no '$py' on PATH; set PYTHON= to the Python with CUDA torch"
if [ "$skip_cuda" != 1 ]; then
  cuda=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null | tail -n 1)
  case "$cuda" in
    1) ;;
    0) fail2 "no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine" ;;
    *) fail2 "'$py' cannot import torch; run it with the Python of a CUDA PyTorch (PYTHON=...)" ;;
  esac
fi
"$py" -c 'import sys; sys.exit(0 if (3, 12) <= sys.version_info[:2] < (3, 14) else 1)' ||
  fail2 "'$py' is Python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); megatron-core 0.19 needs 3.12 or 3.13 (set PYTHON=)"

mkdir -p "$out" || fail2 "cannot create $out"
log="$out/gpu_check.log"
site="$out/site"
rm -rf "$site" "$out/train" "$out/summary.json"
: > "$log"
tmp=$(mktemp -d)
# The stages, most important first, and their caps: shares (percent) of the budget, 90 in all
budget=${GPU_CHECK_BUDGET_S:-450}
case "$budget" in '' | *[!0-9]*) fail2 "GPU_CHECK_BUDGET_S=$budget is not a number of seconds" ;; esac
stage_names=(gpu_tests ops_bench train rollout_bench decode_bench)
stage_shares=(40 10 20 10 10)
declare -A cap
for i in "${!stage_names[@]}"; do
  cap[${stage_names[i]}]=$(( budget * stage_shares[i] / 100 ))
  printf '%s\t%s\n' "${stage_names[i]}" "${cap[${stage_names[i]}]}" >> "$tmp/plan.tsv"
done
stage_pid='' stage_name='' stage_t0=0
# shellcheck disable=SC2317,SC2329 # both run from the traps below
cleanup() { rm -rf "$tmp"; }
# shellcheck disable=SC2317,SC2329
on_signal() {
  if [ -n "$stage_pid" ]; then
    kill -TERM "$stage_pid" 2>/dev/null; wait "$stage_pid" 2>/dev/null
    printf '%s\t130\t%s\t%s\n' "$stage_name" "$(( (${EPOCHREALTIME//[.,]/} - stage_t0) / 1000000 ))" \
      "${cap[$stage_name]}" >> "$tmp/stages.tsv"
  fi
  [ -f "$tmp/env.json" ] && summarize interrupted >> "$log" 2>&1
  echo "gpu-check: interrupted; partial log in $log" >&2
  exit 130
}
trap cleanup EXIT
trap on_signal INT TERM
t_start=${EPOCHREALTIME//[.,]/}

say() { echo "gpu-check: $*"; echo "gpu-check: $*" >> "$log"; }
say "$(date -u '+%Y-%m-%d %H:%M:%S UTC') repository $repo, python $(command -v "$py"), output $out"

# ------------------------------------------------ the wheels, into a private target folder
# requirements.txt always; if-missing.txt only where this interpreter has no such distribution
# (checked before the wheels are on the path). --no-deps: nothing else, torch least of all.
if [ -f "$wheels/requirements.txt" ]; then
  grep -v '^[[:space:]]*\(#\|$\)' "$wheels/requirements.txt" > "$tmp/install.txt"
  if [ -f "$wheels/if-missing.txt" ]; then
    "$py" - "$wheels/if-missing.txt" > "$tmp/missing.txt" 2>> "$log" <<'EOF' ||
import importlib.metadata as md, sys
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if req:
        try:
            md.version(req.split("==")[0])
        except md.PackageNotFoundError:
            print(req)
EOF
      { echo "gpu-check: reading $wheels/if-missing.txt failed; see $log" >&2; exit 2; }
    cat "$tmp/missing.txt" >> "$tmp/install.txt"
    lacks=$(sed 's/==.*//' "$tmp/missing.txt" | paste -sd ' ')
    say "if-missing.txt: the image has $(( $(grep -c . "$wheels/if-missing.txt") - $(grep -c . "$tmp/missing.txt") )) of its $(grep -c . "$wheels/if-missing.txt") packages${lacks:+; it lacks $lacks}"
  fi
  say "installing $(grep -c . "$tmp/install.txt") packages from $wheels into $site"
  if "$py" -m pip --version >/dev/null 2>&1; then
    # --isolated: the image's pip configuration (index, constraints) plays no part
    "$py" -m pip --isolated install --disable-pip-version-check --no-index --no-deps \
      --only-binary=:all: --no-cache-dir --no-compile --find-links "$wheels" --target "$site" \
      -r "$tmp/install.txt" >> "$log" 2>&1
  else  # no pip in the image: a wheel is a zip file; unpack the ones for this Python and machine
    echo "no pip: unpacking the wheels" >> "$log"
    "$py" - "$wheels" "$site" "$tmp/install.txt" >> "$log" 2>&1 <<'EOF'
import platform, re, shutil, sys, zipfile
from pathlib import Path
wheels, site, reqs = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {norm(n): v for n, v in (r.split("==") for r in reqs.read_text().split())}
here, machine = sys.version_info[:2], platform.machine()
def fits(pytag, abi, plat):
    if plat != "any" and not any(p.endswith("_" + machine) for p in plat.split(".")):
        return False
    if abi == "none":
        return any(t in ("py3", "py%d%d" % here) for t in pytag.split("."))
    cps = [tuple(map(int, (t[2], t[3:]))) for t in pytag.split(".") if re.fullmatch(r"cp3\d+", t)]
    return any(c == here if abi != "abi3" else c <= here for c in cps)
done = set()
for w in sorted(wheels.glob("*.whl")):
    parts = w.name[:-4].split("-")
    name, version = norm(parts[0]), parts[1]
    if want.get(name) != version or name in done or not fits(*parts[-3:]):
        continue
    with zipfile.ZipFile(w) as z:
        z.extractall(site)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                shutil.copytree(data / sub, site, dirs_exist_ok=True)
        shutil.rmtree(data)
    done.add(name)
    print("unpacked", w.name)
if set(want) - done:
    sys.exit(f"no wheel for Python {platform.python_version()} on {machine}: "
             + ", ".join(f"{n}=={want[n]}" for n in sorted(set(want) - done)))
EOF
  fi || { echo "gpu-check: installing the wheels from $wheels failed; see $log" >&2; exit 2; }
else
  say "no $wheels/requirements.txt (make it with scripts/fetch_wheels.sh): using the image's packages"
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# ------------------------------------------------ what the image has, what the wheels added
"$py" - "$site" "$tmp/env.json" "$repo" >> "$log" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys, warnings
from pathlib import Path
site, dest, repo = Path(sys.argv[1]).resolve(), sys.argv[2], Path(sys.argv[3]).resolve()
warnings.simplefilter("ignore")
REQUIRED = {"torch": "torch", "triton": "triton", "numpy": "numpy",
            "megatron.core": "megatron-core", "hydra": "hydra-core", "omegaconf": "omegaconf",
            "antlr4": "antlr4-python3-runtime", "yaml": "PyYAML", "safetensors": "safetensors",
            "tqdm": "tqdm", "psutil": "psutil", "sympy": "sympy",
            "math_verify": "math-verify", "pytest": "pytest", "trb_nemo.cli": "trb-nemo"}
# transformers: only HF tokenizers (own models) and `benchmarks/rollout.py --parts d` need it
OPTIONAL = {"pytest_timeout": "pytest-timeout", "tensorboard": "tensorboard",
            "matplotlib": "matplotlib", "transformer_engine": "transformer-engine",
            "transformers": "transformers"}
imports, missing = {}, []
for mod, dist in {**REQUIRED, **OPTIONAL}.items():
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - a broken install is as missing as an absent one
        imports[mod] = {"missing": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        if mod in REQUIRED:
            missing.append(mod)
        continue
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = getattr(m, "__version__", None)
    path = Path(getattr(m, "__file__", None) or next(iter(getattr(m, "__path__", [""])), ""))
    path = path.resolve()
    installed = {"site-packages", "dist-packages"} & set(path.parts)
    source = ("wheels" if site in path.parents else
              "repository" if repo in path.parents and not installed else "image")
    imports[mod] = {"version": str(version), "from": source}
import torch
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda_runtime": torch.version.cuda, "cuda_available": cuda,
       "gpu": torch.cuda.get_device_name(0) if cuda else None,
       "gpu_count": torch.cuda.device_count() if cuda else 0,
       "transformer_engine": imports["transformer_engine"].get("version"),
       "imports": imports, "missing_required": missing}
json.dump(env, open(dest, "w"), indent=1)
for mod, info in imports.items():
    print(f"  {mod:<20} {info.get('version') or 'MISSING'}  "
          f"{info.get('from') or info.get('missing')}")
EOF
[ -f "$tmp/env.json" ] || { echo "gpu-check: the import check failed; see $log" >&2; exit 2; }
envq() { "$py" -c 'import json, sys; print(eval(sys.argv[2], {}, json.load(open(sys.argv[1]))))' "$tmp/env.json" "$1"; }
missing=$(envq '", ".join(missing_required)')
say "python $(envq python), torch $(envq torch) (CUDA $(envq cuda_runtime)), GPU: $(envq gpu), Transformer Engine: $(envq 'transformer_engine or "no (TE/FP8 tests skip)"')"

summarize() {  # summarize STATUS: write summary.json (every stage, in order), print one line each
  "$py" - "$tmp" "$out" "$1" "$t_start" "${EPOCHREALTIME//[.,]/}" <<'EOF'
import json, re, statistics, sys, xml.etree.ElementTree as ET
from pathlib import Path
tmp, out, status, t0, t1 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
env = json.loads((tmp / "env.json").read_text())
read = lambda f: (tmp / f).read_text().splitlines() if (tmp / f).exists() else []
ran = {row.split("\t")[0]: row.split("\t")[1:] for row in read("stages.tsv")}
stages = {}
for name, cap in (row.split("\t") for row in read("plan.tsv")):
    if name not in ran:
        stages[name] = {"status": "not run", "rc": None, "seconds": 0.0, "cap_s": int(cap),
                        "timeout_s": None}
        continue
    rc, seconds, limit = ran[name]
    rc = None if rc == "-" else int(rc)
    st = {"status": "skipped for time" if rc is None else "passed" if rc == 0
          else "timed out" if rc in (124, 137) else "interrupted" if rc == 130 else "failed",
          "rc": rc, "seconds": round(float(seconds), 1), "cap_s": int(cap),
          "timeout_s": int(limit)}
    text = (tmp / f"{name}.out").read_text(errors="replace") if (tmp / f"{name}.out").exists() else ""
    try:
        if name == "gpu_tests" and (tmp / "pytest.xml").exists():
            suites = ET.parse(tmp / "pytest.xml").getroot()
            suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            st.update(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                      failed=n["failures"], errors=n["errors"], skipped=n["skipped"])
        elif name == "train":
            lines = [json.loads(l) for l in (out / "train" / "gpu-check" / "metrics.jsonl")
                     .read_text().splitlines() if l.strip()]
            steps = [r for r in lines if "train/loss" in r]
            evals = [r["eval/pass@1"] for r in lines if "eval/pass@1" in r]
            st.update(steps=len(steps), loss_last=steps[-1]["train/loss"] if steps else None,
                      step_seconds_median=statistics.median(r["time/step_seconds"] for r in steps[1:] or steps) if steps else None,
                      rollout_tokens_per_second_median=statistics.median(r["rollout/tokens_per_second"] for r in steps) if steps else None,
                      beta_mean_warmup=[round(r["rollout/beta_mean"], 4) for r in steps if "rollout/beta_mean" in r],
                      pass_at_1_before=evals[0] if evals else None,
                      pass_at_1_after=evals[-1] if len(evals) > 1 else None,
                      checkpoint=any((out / "train" / "gpu-check" / "checkpoints").glob("step_*")))
        elif name == "ops_bench":
            st["cases"] = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
        elif name == "decode_bench":
            st["results"] = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
        elif name == "rollout_bench":
            pat = r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$"
            st["behaviors"] = {m[1]: {"tokens_per_s": float(m[2]), "ratio_to_student": float(m[3]),
                                      "teacher_calls_per_token": float(m[4]),
                                      "teacher_positions_per_token": float(m[5])}
                               for m in re.finditer(pat, text, re.M)}
    except Exception as e:  # noqa: BLE001 - a stage that failed early leaves little to parse
        st["parse_error"] = f"{type(e).__name__}: {e}"
    stages[name] = st
ok = status == "ran" and bool(stages) and all(s["status"] == "passed" for s in stages.values())
for i, (name, st) in enumerate(stages.items(), 1):
    line = f"gpu-check: {i}. {name:<14}{st['status']:<17}"
    if st["status"] != "not run":
        line += f"{st['seconds']:6.1f} s of {st['timeout_s']} s"
    line += f" (cap {st['cap_s']} s)"
    if "passed" in st:
        line += f"  tests: {st['passed']} passed, {st['failed']} failed, {st['errors']} errors, {st['skipped']} skipped"
    print(line)
summary = {"ok": ok, "status": status, "seconds": round((t1 - t0) / 1e6, 1),
           "machine": {k: env[k] for k in ("gpu", "gpu_count", "torch", "cuda_runtime", "python",
                                           "transformer_engine")},
           "stages": stages, "imports": env["imports"], "log": "gpu_check.log"}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
}

if [ -n "$missing" ]; then
  summarize "missing: $missing" >> "$log"
  echo "gpu-check: '$py' lacks $missing (with $wheels added); see $log" | tee -a "$log" >&2
  exit 2
fi
if [ "$install_only" = 1 ]; then
  summarize "install only" >> "$log"
  say "install only: the imports work; summary in $out/summary.json"
  exit 0
fi

# ------------------------------------------------ the stages
deadline=$(( $(date +%s) + budget ))
: > "$tmp/stages.tsv"
n_failed=0
caps_sum=0
for n in "${stage_names[@]}"; do caps_sum=$(( caps_sum + cap[$n] )); done
say "budget ${budget} s; caps: $(for n in "${stage_names[@]}"; do printf '%s %s s, ' "$n" "${cap[$n]}"; done)${caps_sum} s in all"

run_stage() {  # run_stage NAME CMD...: CMD under min(its cap, time left), output to the log
  # (STAGE_SIGNAL: what the cap sends first, TERM unless set; KILL follows 20 s later)
  local name=$1 limit rc t1 start secs
  shift
  limit=$(( deadline - $(date +%s) ))
  [ "${cap[$name]}" -lt "$limit" ] && limit=${cap[$name]}
  if [ "$limit" -lt 20 ]; then
    printf '%s\t-\t0\t%s\n' "$name" "$limit" >> "$tmp/stages.tsv"
    say "$name: SKIPPED, ${limit} s left of its cap or the time budget ($budget s)"
    n_failed=$((n_failed + 1))
    return
  fi
  say "$name: $* (timeout ${limit}s)"
  start=$(stat -c %s "$log")
  stage_name=$name
  stage_t0=${EPOCHREALTIME//[.,]/}
  timeout --signal="${STAGE_SIGNAL:-TERM}" --kill-after=20 "$limit" "$@" >> "$log" 2>&1 < /dev/null &
  stage_pid=$!
  wait "$stage_pid"
  rc=$?
  stage_pid=
  t1=${EPOCHREALTIME//[.,]/}
  secs=$(( (t1 - stage_t0) / 1000000 )).$(( (t1 - stage_t0) / 100000 % 10 ))
  tail -c +"$((start + 1))" "$log" > "$tmp/$name.out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$tmp/stages.tsv"
  case $rc in
    0) say "$name: passed (${secs} s)" ;;
    124 | 137) say "$name: TIMED OUT after ${secs} s"; n_failed=$((n_failed + 1)) ;;
    *) say "$name: FAILED, exit code $rc (${secs} s)"; n_failed=$((n_failed + 1)) ;;
  esac
}

cd "$repo" || exit 2
# 1. tests/gpu: every test file there (new ones too; the TE/FP8 ones skip without Transformer
# Engine), in this order: those that use Transformer Engine or FP8, then the kernel (Triton,
# fused) ones, then the rest. Explicit files keep that order (pytest sorts a folder's files). On
# its cap pytest gets SIGINT: it stops, reports the tests run so far and writes the XML.
# The image's pytest plugins stay out (they may not fit this pytest); pytest-timeout is loaded
# by name.
te_files=() kernel_files=() other_files=()
while IFS= read -r f; do
  if grep -qiE 'transformer_engine|fp8' "$f"; then te_files+=("$f")
  elif grep -qiE 'triton|fused' "$f"; then kernel_files+=("$f")
  else other_files+=("$f")
  fi
done < <(find tests/gpu -type f \( -name 'test_*.py' -o -name '*_test.py' \) | LC_ALL=C sort)
gpu_files=("${te_files[@]}" "${kernel_files[@]}" "${other_files[@]}")
[ "${#gpu_files[@]}" -gt 0 ] || gpu_files=(tests/gpu)
pytest_args=(-q -p no:cacheprovider -m "not slow" --junitxml="$tmp/pytest.xml")
"$py" -c 'import pytest_timeout' 2>/dev/null && pytest_args+=(-p pytest_timeout)
STAGE_SIGNAL=INT PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 run_stage gpu_tests \
  "$py" -m pytest "${gpu_files[@]}" "${pytest_args[@]}"

# 2. op kernels, eager and Triton-fused, against log_softmax / cross-entropy (2 vocabularies)
# shellcheck disable=SC2086 # GPU_CHECK_*_ARGS: extra arguments, split on spaces
run_stage ops_bench "$py" benchmarks/ops.py ${GPU_CHECK_OPS_ARGS:---repeats 3}

# 3. the toy run on the GPU: 5 steps, TRB warmup over the first 3, one rank, TP=1, NCCL
train_args=(parallel=gpu_tp1 optim.max_steps=5 trb.warmup_steps=3 eval.interval=0
            eval.num_problems=16 eval.num_samples=1 checkpoint.interval=0
            "logging.output_dir='$out/train'" logging.run_name=gpu-check logging.progress_bar=false)
[ "$(envq '"version" in imports["tensorboard"]')" = True ] || train_args+=(logging.tensorboard=false)
# shellcheck disable=SC2086
run_stage train "$py" -m trb_nemo.cli train "${train_args[@]}" ${GPU_CHECK_TRAIN_ARGS:-}

# 4. the rollout engine against the one it replaced (long-tail and uniform lengths, student-only
# and TRB warmup) with the toy models on the GPU
# shellcheck disable=SC2086
run_stage rollout_bench "$py" benchmarks/rollout.py --tp 1 ${GPU_CHECK_ROLLOUT_ARGS:---parts ab --repeats 2}

# 5. the decode step: syncs and launches per step (student, TRB, speculative; the profiler's
# counts), then tok/s at batch 32 with 1k and 4k context, CUDA graphs against eager
# shellcheck disable=SC2086
run_stage decode_bench "$py" benchmarks/decode_step.py --device cuda ${GPU_CHECK_DECODE_ARGS:---parts gh --repeats 15}

if [ "$skip_cuda" = 1 ]; then status="ran without the CUDA check (GPU_CHECK_SKIP_CUDA_CHECK=1)"; else status=ran; fi
summarize "$status" | tee -a "$log"
n=${#stage_names[@]}
if [ "$n_failed" -eq 0 ]; then
  say "all $n stages passed in $(( (${EPOCHREALTIME//[.,]/} - t_start) / 1000000 )) s; summary: $out/summary.json, log: $log"
  exit 0
fi
say "$n_failed of $n stages did not pass; summary: $out/summary.json, log: $log"
exit 1
