"""`trb-nemo launch slurm`: render readable sbatch scripts and submit them.

One job runs the whole run (TRB warmup, then pure OPD), or, with ``launcher.stages=chained``,
two jobs: the warmup (``optim.max_steps = trb.warmup_steps``) and the OPD stage, submitted with
``--dependency=afterok`` on the first; the OPD stage resumes from the warmup's checkpoint (same
run folder) and may use another layout (``launcher.stage2_overrides``, ``launcher.stage2_nodes``).

Safety: the user's overrides are written into the script as single-quoted bash array elements
(:func:`shlex.quote`) and reach the trainer verbatim, never evaluated by a shell. Secrets are
named in ``launcher.env_passthrough``: the script checks they are set and Slurm passes them from
the submitting environment (``--export=ALL``; ``--container-env`` by name into a container);
their values are never written. The composed config of each stage is saved beside its script.

Preemption: ``--signal=B:USR1@<s>`` makes Slurm warn the batch script before the time limit; it
forwards USR1 to the ranks (srun forwards signals to every task), the trainer finishes its step,
checkpoints, writes ``STOPPED_BY_SIGNAL`` and exits; the script then requeues the job
(``--requeue``), which resumes from the checkpoint. Logs append across requeues (stdout to
``%x-%j.out``, stderr to ``%x-%j.err``).

The script runs under ``set -euo pipefail`` (Slurm's variables read as ``${VAR:-}``), stops with
one line when the submitting directory is missing on a node, sets whole-node defaults
(``--exclusive``, ``--mem=0``, ``--gpu-bind=none``, CPUs per task, ``OMP_NUM_THREADS``) and
exports ``launcher.env`` (NCCL and network variables), single-quoted. ``--dry-run`` writes the
same files and prints them with the sbatch lines that submit them (:func:`submission_commands`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trb_nemo.config.compose import composed_yaml, load_config
from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.train.run_dir import STOP_MARKER, RunFolder


@dataclass
class Stage:
    name: str
    """``run`` (one job), or ``warmup`` / ``opd`` (chained)."""
    overrides: list[str]
    cfg: TrainConfig
    nodes: int


def plan_stages(overrides: list[str]) -> list[Stage]:
    """The job(s) to submit, each with its validated config (ConfigError on bad input)."""
    cfg = _load(overrides)
    launcher = cfg.launcher
    if launcher.stages == "one_job":
        stages = [Stage("run", list(overrides), cfg, launcher.nodes)]
    else:
        if cfg.rollout.behavior != "trb" or cfg.trb.warmup_steps == 0:
            raise ConfigError("launcher.stages", "chained stages split the TRB warmup from pure "
                              "OPD: needs rollout.behavior=trb and trb.warmup_steps > 0")
        if cfg.trb.warmup_steps >= cfg.optim.max_steps:
            raise ConfigError("trb.warmup_steps", f"must be < optim.max_steps={cfg.optim.max_steps} "
                              "for a chained OPD stage")
        first = [*overrides, f"optim.max_steps={cfg.trb.warmup_steps}"]
        second = [*overrides, *launcher.stage2_overrides]
        stages = [Stage("warmup", first, _load(first), launcher.nodes),
                  Stage("opd", second, _load(second), launcher.stage2_nodes or launcher.nodes)]
    for st in stages:
        ranks = st.nodes * st.cfg.launcher.ranks_per_node
        mp = st.cfg.parallel.model_parallel_size
        if ranks % mp:
            raise ConfigError("launcher.nodes", f"{st.name} stage: {st.nodes} nodes x "
                              f"{st.cfg.launcher.ranks_per_node} ranks is not a multiple of TP x PP = {mp}")
        taken = sorted(SCRIPT_VARIABLES & set(st.cfg.launcher.env))
        if taken:
            raise ConfigError("launcher.env", f"{', '.join(taken)}: used by the job script itself")
        check_memory(st.cfg, ranks)
    return stages


def check_memory(cfg: TrainConfig, ranks: int) -> None:
    """The stage's per-GPU memory plan (:mod:`trb_nemo.plan.memory`) fits
    ``parallel.gpu_memory_gb`` on ``ranks`` ranks; checkpoints not on this machine are planned
    from the inline shapes. CPU (gloo) runs are not planned."""
    if cfg.parallel.backend == "gloo":
        return
    from trb_nemo.models.resolve import resolve_models
    from trb_nemo.plan.memory import check_config

    check_config(resolve_models(cfg, absent=[]), ranks)


SCRIPT_VARIABLES = {"WORKDIR", "RUN_DIR", "HOSTS", "CPUS_PER_TASK", "ARGS", "PID", "rc"}
"""The job script's own shell variables: launcher.env may not overwrite them."""


def _load(overrides: list[str]) -> TrainConfig:
    """load_config, saying how to add a key to launcher.env (Hydra wants ``++`` for a new key)."""
    try:
        return load_config(overrides)
    except ConfigError as e:
        if e.key.startswith("launcher.env.") and ("unknown key" in e.reason or "struct" in e.reason):
            name = e.key.removeprefix("launcher.env.")
            raise ConfigError(e.key, f"a new variable is added with ++launcher.env.{name}=VALUE "
                              "(++ adds or replaces a key)") from None
        raise


def _trainer_command(cfg: TrainConfig) -> list[str]:
    if cfg.launcher.container_image:
        return ["trb-nemo"]  # the image's entry point
    return [sys.executable, "-m", "trb_nemo.cli"]  # the submitting environment's Python


def _directives(stage: Stage, log_dir: Path) -> list[str]:
    la = stage.cfg.launcher
    q = shlex.quote
    name = la.job_name + ("" if stage.name == "run" else "-" + stage.name)
    d: list[tuple[str, str]] = [(f"job-name={q(name)}", ""), (f"nodes={stage.nodes}", "")]
    if la.launch_mode == "srun":
        d.append((f"ntasks-per-node={la.ranks_per_node}", "one task per rank"))
    else:
        d.append(("ntasks-per-node=1", "torchrun starts the ranks of a node"))
    if la.cpus_per_task:
        d.append((f"cpus-per-task={la.cpus_per_task}", ""))
    if la.gpus_per_node:
        d.append((f"gpus-per-node={la.gpus_per_node}", ""))
        if la.gpu_bind:
            d.append((f"gpu-bind={q(la.gpu_bind)}", "each rank sees all GPUs of its node"))
    if la.exclusive:
        d.append(("exclusive", "whole nodes, shared with no other job"))
    if la.mem is not None:
        d.append((f"mem={q(la.mem)}", "all of the node's memory" if la.mem == "0" else ""))
    d += [(f"{k}={q(str(v))}", "") for k, v in {"partition": la.partition,
                                                 "account": la.account}.items() if v]
    d += [(f"time={q(la.time_limit)}", ""),
          (f"output={q(str(log_dir / '%x-%j.out'))}", ""),
          (f"error={q(str(log_dir / '%x-%j.err'))}", ""),
          ("open-mode=append", "a requeued job appends to the same logs"),
          ("export=ALL", "the submitting environment, secrets by name")]
    if la.signal_seconds_before_end:
        d += [(f"signal=B:USR1@{la.signal_seconds_before_end}", "warn this script before the "
               "time limit"), ("requeue", "it may requeue itself")]
    return [f"#SBATCH --{o:<28} # {c}" if c else f"#SBATCH --{o}" for o, c in d]


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


_MISSING_DIR = ('echo "trb-nemo: working directory $WORKDIR does not exist on '
                '${SLURMD_NODENAME:-$HOSTNAME} (shared filesystem not mounted?)" >&2')
"""The line a node without the submitting directory prints before the script stops."""


def render(stage: Stage, log_dir: Path, workdir: Path) -> str:
    """The sbatch script of one stage (readable, commented, safe to edit).

    ``#SBATCH`` lines must precede the first command, so ``set -euo pipefail`` follows them.
    """
    q = shlex.quote
    args = "\n".join(f"  {q(a)}" for a in ["train", *stage.overrides])
    return (_script_head(stage, log_dir, workdir) + _script_environment(stage)
            + _script_run(args, _srun_line(stage)))


def _srun_line(stage: Stage) -> str:
    """The command that starts the ranks (in the background: the script waits on it)."""
    cfg, la = stage.cfg, stage.cfg.launcher
    q = shlex.quote
    torchrun = la.launch_mode == "torchrun"
    env_names = _unique([*la.env_passthrough, "OMP_NUM_THREADS", *la.env])
    pyxis = {"container-image": la.container_image, "container-mounts": ",".join(la.container_mounts),
             "container-workdir": la.container_workdir,
             "container-env": ",".join(env_names)} if la.container_image else {}
    container = [f"--{k}={q(v)}" for k, v in pyxis.items() if v]
    srun = " ".join(["srun --kill-on-bad-exit=1 --label", *(["--ntasks-per-node=1"] if torchrun
                                                            else []),
                     '--cpus-per-task="$CPUS_PER_TASK"', *container])
    if torchrun:
        program = (f"torchrun --nnodes=\"${{SLURM_NNODES:-{stage.nodes}}}\" "
                   f"--nproc-per-node={la.ranks_per_node} \\\n"
                   f"    --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" "
                   f"--rdzv-id=\"${{SLURM_JOB_ID:-0}}\" \\\n    -m trb_nemo.cli")
    else:
        program = " ".join(q(c) for c in _trainer_command(cfg))
    return f"{srun} \\\n    {program} \"${{ARGS[@]}}\" &"


def _other_nodes_check(stage: Stage) -> str:
    """On a multi-node job outside a container, a step that stops the job when the submitting
    directory is missing on another node; else nothing."""
    if stage.nodes <= 1 or stage.cfg.launcher.container_image:
        return ""
    missing_dir = _MISSING_DIR
    return f"""
# Ranks on the other nodes start in the same directory (Slurm would silently use /tmp there).
# shellcheck disable=SC2016
srun --nodes={stage.nodes} --ntasks={stage.nodes} --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=1 \\
    bash -c 'WORKDIR=$1; cd "$WORKDIR" 2>/dev/null || {{ {missing_dir}; exit 1; }}' check-workdir "$WORKDIR"
"""


def _cpu_lines(stage: Stage) -> tuple[str, str, str]:
    """The lines that set CPUS_PER_TASK and OMP_NUM_THREADS, and what the threads default to
    (in words)."""
    la = stage.cfg.launcher
    torchrun = la.launch_mode == "torchrun"
    tasks_per_node = 1 if torchrun else la.ranks_per_node
    if la.cpus_per_task:
        cpus = f"CPUS_PER_TASK={la.cpus_per_task}                       # launcher.cpus_per_task"
    else:
        cpus = (f"CPUS_PER_TASK=$(( ${{SLURM_CPUS_ON_NODE:-{tasks_per_node}}} / {tasks_per_node} ))"
                "   # launcher.cpus_per_task=null: the node's CPUs over its tasks\n"
                'if [ "$CPUS_PER_TASK" -lt 1 ]; then CPUS_PER_TASK=1; fi')
    share = "its share of the task's CPUs" if torchrun else "one per CPU"
    threads = "$CPUS_PER_TASK" if not torchrun else f"$(( CPUS_PER_TASK / {la.ranks_per_node} ))"
    omp = f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}"
    if torchrun:
        omp += '\nif [ "$OMP_NUM_THREADS" -lt 1 ]; then OMP_NUM_THREADS=1; fi'
    return cpus, omp, share


def _script_head(stage: Stage, log_dir: Path, workdir: Path) -> str:
    """The script up to the working directory's checks: header, ``#SBATCH`` lines, secrets."""
    cfg, la = stage.cfg, stage.cfg.launcher
    run_dir = log_dir.parent
    q = shlex.quote
    secrets = "\n".join(f': "${{{n}:?{n} must be set in the environment this job is submitted from}}"'
                        for n in la.env_passthrough) or "# (none: launcher.env_passthrough is empty)"
    missing_dir = _MISSING_DIR
    other_nodes = _other_nodes_check(stage)
    return f"""#!/bin/bash
# trb-nemo, stage `{stage.name}` of run {q(cfg.logging.run_name)}: generated by
# `trb-nemo launch slurm`; edit freely. Its composed config: {q(str(log_dir / f'{stage.name}.config.yaml'))}
{chr(10).join(_directives(stage, log_dir))}

set -euo pipefail

# Secrets come from the submitting environment by name; their values are never written here.
{secrets}

# The directory the run was submitted from: it must exist on every node (a shared filesystem).
WORKDIR={q(str(workdir))}
RUN_DIR={q(str(run_dir))}
if ! cd "$WORKDIR" 2>/dev/null; then
    {missing_dir}
    exit 1
fi
{other_nodes}
"""


def _script_environment(stage: Stage) -> str:
    """The rendezvous address, the CPUs and threads of each rank and launcher.env."""
    q = shlex.quote
    cpus, omp, share = _cpu_lines(stage)
    exports = "\n".join(f"export {k}={q(v)}" for k, v in stage.cfg.launcher.env.items()) or "# (none)"
    return f"""# Rendezvous on the first node of the allocation.
HOSTS=$(scontrol show hostnames "${{SLURM_JOB_NODELIST:-}}")
MASTER_ADDR=${{HOSTS%%$'\\n'*}}  # the first line
export MASTER_ADDR
export MASTER_PORT=$((20000 + ${{SLURM_JOB_ID:-0}} % 10000))

# CPUs of each task (given to srun explicitly: Slurm 22.05 to 23.02 do not pass --cpus-per-task
# on) and each rank's threads: OMP_NUM_THREADS of the submitting environment, else {share};
# launcher.env below may set it.
{cpus}
{omp}

# launcher.env: exported to every rank, values written literally (single-quoted, never expanded).
{exports}

"""


def _script_run(args: str, launch: str) -> str:
    """The trainer's arguments, the signal forwarding, the launch and the requeue."""
    return f"""# The trainer's arguments, one per line, single-quoted: passed verbatim, never evaluated.
ARGS=(
{args}
)

# The warning signal (USR1) goes to every rank: finish the step, checkpoint, exit.
PID=""
# shellcheck disable=SC2317,SC2329  # invoked by the trap (SC2317 before shellcheck 0.10)
forward() {{
    echo "trb-nemo: warning signal, asking the ranks to checkpoint"
    if [ -n "$PID" ]; then kill -USR1 "$PID" 2>/dev/null || true; fi
}}
trap forward USR1

{launch}
PID=$!
# `wait` returns early when the signal arrives: keep waiting while srun runs.
while kill -0 "$PID" 2>/dev/null; do wait "$PID" || true; done
rc=0
wait "$PID" || rc=$?

if [ -f "$RUN_DIR/{STOP_MARKER}" ]; then
    rm -f "$RUN_DIR/{STOP_MARKER}"
    echo "trb-nemo: checkpoint saved after the warning signal; requeueing job ${{SLURM_JOB_ID:-}}"
    scontrol requeue "${{SLURM_JOB_ID:-}}"
    exit 0
fi
exit "$rc"
"""


def log_dir_of(stage: Stage, workdir: Path) -> Path:
    """``<run_dir>/slurm``, absolute (a relative output_dir is taken from ``workdir``)."""
    return (workdir / RunFolder.of(stage.cfg).slurm).resolve()


def write_scripts(stages: list[Stage], workdir: Path) -> list[Path]:
    """Each stage's script and composed config under ``<run_dir>/slurm/``."""
    paths = []
    for st in stages:
        log_dir = log_dir_of(st, workdir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{st.name}.config.yaml").write_text(composed_yaml(st.cfg))
        path = log_dir / f"{st.name}.sbatch"
        path.write_text(render(st, log_dir, workdir))
        paths.append(path)
    return paths


def config_path_of(script: Path) -> Path:
    """The composed config saved beside a stage's script (``warmup.sbatch`` -> ``warmup.config.yaml``)."""
    return script.with_name(script.name.removesuffix(".sbatch") + ".config.yaml")


def submission_commands(stages: list[Stage], paths: list[Path]) -> str:
    """The shell lines that submit ``paths`` as :func:`submit` does: each stage after the
    previous one succeeded (``--dependency=afterok:<its job id>``)."""
    q = shlex.quote
    lines = [f': "${{{n}:?{n} must be set: the job takes it from this environment}}"'
             for n in stages[0].cfg.launcher.env_passthrough]
    previous = None
    for st, path in zip(stages, paths, strict=True):
        var = f"{st.name.upper()}_JOB_ID"
        after = f' "--dependency=afterok:${previous}"' if previous else ""
        lines += [f"{var}=$(sbatch --parsable{after} {q(str(path))})",
                  f"{var}=${{{var}%%;*}}   # --parsable prints <job id>[;<cluster>]",
                  f'echo "submitted the {st.name} stage as job ${var}"']
        previous = var
    return "\n".join(lines)


def dry_run_report(stages: list[Stage], paths: list[Path]) -> str:
    """What ``--dry-run`` prints: each script as written, the files written, and the commands
    that would submit them."""
    parts = []
    for path in paths:
        parts += [f"# ==> {path} <==", path.read_text()]
    written = [p for path in paths for p in (path, config_path_of(path))]
    parts += ["# --dry-run: nothing submitted. Written (a real submission writes the same):",
              *(f"#   {p}" for p in written),
              "# To submit them as `trb-nemo launch slurm` would, run:",
              submission_commands(stages, paths)]
    return "\n".join(parts)


def submit(paths: list[Path], env_passthrough: list[str], environ: dict) -> list[str]:
    """sbatch each script, chaining with afterok; returns the job ids."""
    missing = [n for n in env_passthrough if n not in environ]
    if missing:
        raise ConfigError("launcher.env_passthrough", f"not set in this environment: {', '.join(missing)}")
    ids: list[str] = []
    for path in paths:
        cmd = ["sbatch", "--parsable"]
        if ids:
            cmd.append(f"--dependency=afterok:{ids[-1]}")
        out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, env=environ)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {path.name} failed: {out.stderr.strip()}")
        ids.append(out.stdout.strip().split(";")[0])
    return ids


def main(args) -> int:
    """`trb-nemo launch slurm [--dry-run] [a.b=c ...]`: plan every stage (every check before
    anything is submitted), write the scripts, then submit them (or print them)."""
    import os

    stages = plan_stages(args.overrides)
    paths = write_scripts(stages, Path.cwd())  # a dry run writes the same files
    if args.dry_run:
        print(dry_run_report(stages, paths))
        return 0
    ids = submit(paths, stages[0].cfg.launcher.env_passthrough, dict(os.environ))
    for st, path, job in zip(stages, paths, ids, strict=True):
        print(f"trb-nemo: submitted {st.name} stage as job {job}: {path}")
    return 0
