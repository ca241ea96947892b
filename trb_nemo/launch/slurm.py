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
(``--requeue``), which resumes from the checkpoint. Logs append across requeues.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trb_nemo.config.compose import composed_yaml, load_config
from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.train.run_dir import STOP_MARKER, run_dir_of


@dataclass
class Stage:
    name: str
    """``run`` (one job), or ``warmup`` / ``opd`` (chained)."""
    overrides: list[str]
    cfg: TrainConfig
    nodes: int


def plan_stages(overrides: list[str]) -> list[Stage]:
    """The job(s) to submit, each with its validated config (ConfigError on bad input)."""
    cfg = load_config(overrides)
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
        stages = [Stage("warmup", first, load_config(first), launcher.nodes),
                  Stage("opd", second, load_config(second), launcher.stage2_nodes or launcher.nodes)]
    for st in stages:
        ranks = st.nodes * st.cfg.launcher.ranks_per_node
        mp = st.cfg.parallel.model_parallel_size
        if ranks % mp:
            raise ConfigError("launcher.nodes", f"{st.name} stage: {st.nodes} nodes x "
                              f"{st.cfg.launcher.ranks_per_node} ranks is not a multiple of TP x PP = {mp}")
    return stages


def _trainer_command(cfg: TrainConfig) -> list[str]:
    if cfg.launcher.container_image:
        return ["trb-nemo"]  # the image's entry point
    return [sys.executable, "-m", "trb_nemo.cli"]  # the submitting environment's Python


def render(stage: Stage, log_dir: Path, workdir: Path) -> str:
    """The sbatch script of one stage (readable, commented, safe to edit)."""
    cfg, la = stage.cfg, stage.cfg.launcher
    run_dir = log_dir.parent
    q = shlex.quote
    ranks_per_node = la.ranks_per_node
    d = [f"#SBATCH --job-name={q(la.job_name + ('' if stage.name == 'run' else '-' + stage.name))}",
         f"#SBATCH --nodes={stage.nodes}"]
    if la.launch_mode == "srun":
        d.append(f"#SBATCH --ntasks-per-node={ranks_per_node}")
    else:
        d.append("#SBATCH --ntasks-per-node=1          # torchrun starts the ranks of a node")
    optional = {"gpus-per-node": la.gpus_per_node, "partition": la.partition, "account": la.account}
    d += [f"#SBATCH --{k}={q(str(v))}" for k, v in optional.items() if v]
    d += [f"#SBATCH --time={q(la.time_limit)}",
          f"#SBATCH --output={q(str(log_dir / '%x-%j.out'))}",
          "#SBATCH --open-mode=append            # a requeued job appends to the same log",
          "#SBATCH --export=ALL                  # the submitting environment, secrets by name"]
    if la.signal_seconds_before_end:
        d += [f"#SBATCH --signal=B:USR1@{la.signal_seconds_before_end}   # warn this script before "
              "the time limit", "#SBATCH --requeue                     # it may requeue itself"]
    pyxis = {"container-image": la.container_image, "container-mounts": ",".join(la.container_mounts),
             "container-workdir": la.container_workdir,
             "container-env": ",".join(la.env_passthrough)} if la.container_image else {}
    container = [f"--{k}={q(v)}" for k, v in pyxis.items() if v]
    args = "\n".join(f"  {q(a)}" for a in ["train", *stage.overrides])
    torchrun = la.launch_mode == "torchrun"
    srun = " ".join(["srun --kill-on-bad-exit=1 --label", *(["--ntasks-per-node=1"] if torchrun
                                                            else []), *container])
    if torchrun:
        program = (f"torchrun --nnodes=\"$SLURM_NNODES\" --nproc-per-node={ranks_per_node} \\\n"
                   f"    --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" "
                   f"--rdzv-id=\"$SLURM_JOB_ID\" \\\n    -m trb_nemo.cli")
    else:
        program = " ".join(q(c) for c in _trainer_command(cfg))
    launch = f"{srun} \\\n    {program} \"${{ARGS[@]}}\" &"
    secrets = "\n".join(f': "${{{n}:?{n} must be set in the environment this job is submitted from}}"'
                        for n in la.env_passthrough) or "# (none: launcher.env_passthrough is empty)"
    return f"""#!/bin/bash
# trb-nemo, stage `{stage.name}` of run {q(cfg.logging.run_name)}: generated by
# `trb-nemo launch slurm`; edit freely. Its composed config: {q(str(log_dir / f'{stage.name}.config.yaml'))}
{chr(10).join(d)}

# Secrets come from the submitting environment by name; their values are never written here.
{secrets}

# Rendezvous on the first node of the allocation.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
RUN_DIR={q(str(run_dir))}
cd {q(str(workdir))}

# The trainer's arguments, one per line, single-quoted: passed verbatim, never evaluated.
ARGS=(
{args}
)

# The warning signal (USR1) goes to every rank: finish the step, checkpoint, exit.
forward() {{ echo "trb-nemo: warning signal, asking the ranks to checkpoint"; kill -USR1 "$PID" 2>/dev/null || true; }}
trap forward USR1

{launch}
PID=$!
while kill -0 "$PID" 2>/dev/null; do wait "$PID" || true; done
wait "$PID"; rc=$?

if [ -f "$RUN_DIR/{STOP_MARKER}" ]; then
    rm -f "$RUN_DIR/{STOP_MARKER}"
    echo "trb-nemo: checkpoint saved after the warning signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit $rc
"""


def log_dir_of(stage: Stage, workdir: Path) -> Path:
    """``<run_dir>/slurm``, absolute (a relative output_dir is taken from ``workdir``)."""
    return (workdir / run_dir_of(stage.cfg) / "slurm").resolve()


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
