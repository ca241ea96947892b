"""`make gpu-check` (scripts/gpu_check.sh) and `make wheels` (scripts/fetch_wheels.sh), on a CPU.

Without CUDA, gpu_check.sh must stop before anything expensive: exit code 2, one line. Its
summary names every stage, in order, with caps inside the budget, even when the budget is
spent. The wheel folder (made by the real fetch_wheels.sh; needs the package index, skipped
when pip cannot reach it) stays small and holds no torch; the check's install step
(--install-only) installs it into a venv that holds only torch and what pip brings with torch,
after which every module the check requires imports there.

Run: .venv/bin/python -m pytest tests/unit/test_gpu_check.py        (-m "not slow": no network)
"""

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
FETCH = ROOT / "scripts" / "fetch_wheels.sh"
LIMIT_BYTES = 48_000_000  # one architecture (x86_64): 41 MB today
STAGES = ["gpu_tests", "ops_bench", "train", "rollout_bench", "decode_bench"]
BARE = ("numpy", "yaml", "safetensors", "megatron", "hydra", "math_verify", "pytest")
"""Modules a torch-only venv lacks and the wheels bring."""
NO_CUDA = "gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k != "PYTHONPATH"}
    env.update({"PYTHON": sys.executable, **extra})
    return env


@pytest.mark.parametrize("script", [GPU_CHECK, FETCH], ids=lambda p: p.name)
def test_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


@needs_no_cuda
def test_without_cuda_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([str(GPU_CHECK), str(tmp_path / "wheels"), str(out)], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [NO_CUDA]
    assert r.stdout == ""
    assert not out.exists()  # checked before anything is installed or written


def test_without_torch_exits_2_with_one_line(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run([str(GPU_CHECK), str(tmp_path / "w"), str(tmp_path / "o")],
                       env=_env(PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert line.startswith("gpu-check: ") and "cannot import torch" in line


@needs_no_cuda
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_cuda(tmp_path):
    r = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check",
                        f"WHEELS={tmp_path / 'w'}", f"OUT={tmp_path / 'o'}"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    ours = [line for line in r.stderr.splitlines() if not line.startswith("make")]
    assert ours == [NO_CUDA]  # plus make's own "*** [gpu-check] Error 2"
    assert r.stdout == ""


def _required() -> dict:
    """The script's REQUIRED table (module -> distribution), read from the script itself."""
    m = re.search(r"^REQUIRED = (\{.*?\})$", GPU_CHECK.read_text(), re.S | re.M)
    return ast.literal_eval(m[1])


def test_required_list_is_what_a_run_needs():
    required = _required()
    assert {"yaml", "safetensors", "numpy", "megatron.core", "trb_nemo.cli"} <= set(required)
    assert "transformers" not in required  # optional: only HF tokenizers import it


def test_summary_names_every_stage_when_the_budget_is_spent(tmp_path):
    """A 30 s budget leaves every stage under 20 s: each is skipped for time, and the summary and
    the last lines still name all five, in order (no wheels folder: the venv's own packages)."""
    out = tmp_path / "out"
    r = subprocess.run([str(GPU_CHECK), str(tmp_path / "none"), str(out)],
                       env=_env(GPU_CHECK_SKIP_CUDA_CHECK="1", GPU_CHECK_BUDGET_S="30"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert list(stages) == STAGES
    assert all(s["status"] == "skipped for time" for s in stages.values()), stages
    assert sum(s["cap_s"] for s in stages.values()) <= 0.9 * 30
    table = [line for line in r.stdout.splitlines() if re.match(r"gpu-check: \d\. ", line)]
    assert [line.split()[2] for line in table] == STAGES
    assert all("skipped for time" in line for line in table)
    assert r.stdout.splitlines()[-1].startswith("gpu-check: 5 of 5 stages did not pass")


def _pip_reaches_the_index(tmp_path_factory) -> str | None:
    """None when pip downloads a small wheel from the package index (not from a cache or the
    configured local folders: iniconfig is in neither); else pip's last line."""
    probe = tmp_path_factory.mktemp("probe")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--timeout", "15", "--retries", "1", "-d", str(probe), "iniconfig==2.3.1"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 0 and list(probe.glob("iniconfig-*.whl")):
        return None
    return (r.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The folder the real fetch_wheels.sh makes (x86_64, about 15 s), once for this module;
    skips when pip cannot reach the package index."""
    why = _pip_reaches_the_index(tmp_path_factory)
    if why is not None:
        pytest.skip(f"the package index cannot be reached (pip download failed: {why})")
    folder = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([str(FETCH), str(folder)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return folder


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().split() if line]


@pytest.mark.slow
def test_fetch_wheels_makes_a_small_folder(wheels):
    files = sorted(p.name for p in wheels.glob("*.whl"))
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) < LIMIT_BYTES
    for name in ("megatron_core-", "hydra_core-", "omegaconf-", "antlr4_python3_runtime-4.9",
                 "math_verify-", "latex2sympy2_extended-", "pytest-", "psutil-", "numpy-",
                 "pyyaml-", "safetensors-"):
        assert any(f.startswith(name) for f in files), f"no {name}* wheel in {files}"
    for name in ("megatron_core-", "numpy-", "pyyaml-"):  # compiled, one per CPython
        assert {f.split("-")[2] for f in files if f.startswith(name)} == {"cp312", "cp313"}, name
    assert not any(f.startswith(("torch-", "triton-", "nvidia", "transformers-")) for f in files)
    always, if_missing = _lines(wheels / "requirements.txt"), _lines(wheels / "if-missing.txt")
    assert [r.split("==")[0] for r in if_missing] == ["numpy", "PyYAML", "safetensors"]
    names = {canonicalize_name(f.split("-")[0]) for f in files}
    assert {canonicalize_name(r.split("==")[0]) for r in always + if_missing} == names


@pytest.mark.slow
def test_install_only_keeps_the_images_own_packages(wheels, tmp_path):
    """--install-only with this venv as the image: the pinned packages come from the wheels,
    numpy / PyYAML / safetensors stay the image's (if-missing.txt), torch is the image's; every
    stage is listed as not run, with caps that add to at most 90% of the 450 s budget."""
    out = tmp_path / "out"
    r = subprocess.run([str(GPU_CHECK), "--install-only", str(wheels), str(out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    imports = summary["imports"]
    for mod in ("megatron.core", "hydra", "omegaconf", "math_verify", "pytest"):
        assert imports[mod]["from"] == "wheels", (mod, imports[mod])
    for mod in ("torch", "numpy", "yaml", "safetensors"):
        assert imports[mod]["from"] == "image", (mod, imports[mod])
    assert imports["trb_nemo.cli"]["from"] == "repository"
    assert summary["machine"]["torch"] == torch.__version__
    assert summary["status"] == "install only" and list(summary["stages"]) == STAGES
    assert {s["status"] for s in summary["stages"].values()} == {"not run"}
    caps = [s["cap_s"] for s in summary["stages"].values()]
    assert sum(caps) <= 0.9 * 450 and caps[0] == max(caps)
    assert not list((out / "site").glob("numpy*"))


def _torch_and_its_requirements() -> list:
    """The distributions `pip install torch` brings, as installed in this venv: torch and its
    requirements, recursively, markers evaluated and extras followed."""
    found, seen, todo = {}, set(), [("torch", frozenset())]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[canonicalize_name(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


@pytest.fixture(scope="module")
def torch_only_venvs(tmp_path_factory):
    """Two fresh venvs (one with pip, one without) holding only torch and what pip installs with
    it: their site-packages link to those distributions' files in this venv (no 800 MB copy)."""
    dists = _torch_and_its_requirements()
    assert "numpy" not in {canonicalize_name(d.metadata["Name"]) for d in dists}
    venvs = {}
    for kind, flags in (("pip", []), ("no pip", ["--without-pip"])):
        venv = tmp_path_factory.mktemp("venv")
        subprocess.run([sys.executable, "-m", "venv", *flags, str(venv)], check=True, timeout=120)
        site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        for dist in dists:
            for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
                src, dst = Path(dist.locate_file(top)), site / top
                if src.exists() and not dst.exists():
                    dst.symlink_to(src)
        venvs[kind] = venv / "bin" / "python"
    return venvs


def _imports(python: Path, modules, pythonpath: str | None = None) -> dict:
    """module -> its file, or the error importing it raised, in a fresh `python`."""
    code = ("import importlib, json, sys\nres = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        res[m] = getattr(importlib.import_module(m), '__file__', '') or ''\n"
            "    except Exception as e:\n        res[m] = 'ERROR ' + type(e).__name__ + ': ' + str(e)\n"
            "print(json.dumps(res))")
    env = _env(**({"PYTHONPATH": pythonpath} if pythonpath else {}))
    r = subprocess.run([str(python), "-c", code, *modules], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pip", "no pip"])
def test_install_step_in_a_torch_only_venv(wheels, torch_only_venvs, tmp_path, kind):
    """A bare CUDA-torch machine: before, the venv has torch but none of what the wheels bring;
    the check's install step alone (--install-only) succeeds, with pip or by unpacking the
    wheels; after it, every module of the script's REQUIRED list imports in that venv, the
    if-missing packages from OUT/site, torch from the venv, and the venv itself is unchanged."""
    python = torch_only_venvs[kind]
    probe = ("import importlib.util as u, sys; "
             "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))")
    lacks = subprocess.run([str(python), "-c", probe, "torch", *BARE], env=_env(),
                           capture_output=True, text=True, check=True).stdout.split()
    assert lacks == list(BARE)  # torch is there, nothing the wheels bring is
    def site_packages():  # what the venv holds (Python's own __pycache__ aside)
        return sorted(p.name for p in (python.parents[1] / "lib").glob("*/site-packages/*")
                      if p.name != "__pycache__")

    site_before = site_packages()

    out = tmp_path / "out"
    r = subprocess.run([str(GPU_CHECK), "--install-only", str(wheels), str(out)],
                       env=_env(PYTHON=str(python)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + (out / "gpu_check.log").read_text()
    assert "it lacks numpy PyYAML safetensors" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "install only" and not summary["imports"]["torch"].get("missing")

    found = _imports(python, list(_required()), f"{out / 'site'}:{ROOT}")
    broken = {m: f for m, f in found.items() if f.startswith("ERROR")}
    assert not broken, broken
    for mod in ("numpy", "yaml", "safetensors", "megatron.core"):
        assert Path(found[mod]).is_relative_to(out / "site"), (mod, found[mod])
    assert Path(found["torch"]).is_relative_to(python.parents[1])
    assert site_packages() == site_before
