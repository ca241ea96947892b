"""The Dockerfile passes hadolint and keeps the NGC image's CUDA torch.

Run: .venv/bin/python -m pytest tests/unit/test_dockerfile.py
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hadolint():
    return shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_hadolint_is_clean_and_does_find_problems(tmp_path):
    ok = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && pip install torch\n")
    found = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert found.returncode != 0 and "DL3006" in found.stdout


def test_image_keeps_its_torch_and_ships_the_toy_run():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/(pytorch|nemo):", text, flags=re.M)
    installs = " ".join(re.findall(r"pip install[^\n]*(?:\n\s+[^\n]*)*", text))
    assert "--no-deps -e ." in installs and not re.search(r"\btorch[=<>\" ]", installs)
    for folder in ("trb_nemo", "conf", "examples"):
        assert f"COPY {folder} ./{folder}" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored or ".venv/" in ignored
