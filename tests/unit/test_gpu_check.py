"""`make gpu-check` (scripts/gpu_check.sh) and `make wheels` (scripts/fetch_wheels.sh), on a CPU.

Without CUDA, gpu_check.sh must stop before anything expensive: exit code 2, one line. The
wheel folder (needs the package index; skipped when it cannot be reached) stays under 10 MB and
installs into a private folder where Megatron-Core, Hydra and math-verify then import.

Run: .venv/bin/python -m pytest tests/unit/test_gpu_check.py        (-m "not slow": no network)
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
FETCH = ROOT / "scripts" / "fetch_wheels.sh"
LIMIT_BYTES = 10_000_000
NO_CUDA = "gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
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


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The folder fetch_wheels.sh makes; skips when the package index cannot be reached."""
    probe = tmp_path_factory.mktemp("probe")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "15",
                        "--retries", "1", "-d", str(probe), "iniconfig==2.3.1"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the package index cannot be reached (pip download failed: {tail})")
    folder = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([str(FETCH), str(folder)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return folder


@pytest.mark.slow
def test_fetch_wheels_makes_a_small_folder(wheels):
    files = sorted(p.name for p in wheels.glob("*.whl"))
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) < LIMIT_BYTES
    for name in ("megatron_core-", "hydra_core-", "omegaconf-", "antlr4_python3_runtime-4.9",
                 "math_verify-", "latex2sympy2_extended-", "pytest-", "psutil-"):
        assert any(f.startswith(name) for f in files), f"no {name}* wheel in {files}"
    megatron = [f for f in files if f.startswith("megatron_core-")]
    assert {f.split("-")[2] for f in megatron} == {"cp312", "cp313"}
    assert not any(f.startswith(("torch-", "numpy-", "transformers-")) for f in files)
    reqs = (wheels / "requirements.txt").read_text().split()
    assert len(reqs) == len(files) - 1 and all("==" in r for r in reqs)  # megatron: 2 wheels


@pytest.mark.slow
def test_install_only_imports_from_the_wheels(wheels, tmp_path):
    """GPU_CHECK_INSTALL_ONLY=1 (testing only): skip the CUDA check, install into OUT/site,
    check the imports, stop. Megatron-Core must come from the wheels, torch from the image."""
    out = tmp_path / "out"
    r = subprocess.run([str(GPU_CHECK), str(wheels), str(out)],
                       env=_env(GPU_CHECK_INSTALL_ONLY="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    imports = summary["imports"]
    for mod in ("megatron.core", "hydra", "omegaconf", "math_verify", "pytest"):
        assert imports[mod]["from"] == "wheels", (mod, imports[mod])
    assert imports["torch"]["from"] == "image"
    assert imports["trb_nemo.cli"]["from"] == "repository"
    assert summary["machine"]["torch"] == torch.__version__
    assert summary["status"] == "install only" and summary["stages"] == {}
    assert (out / "gpu_check.log").read_text().count("gpu-check:") >= 3
