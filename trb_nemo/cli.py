"""`trb-nemo`: the command line, a parser that dispatches: each subcommand runs
``trb_nemo.commands.<name>.main(args)`` (train, eval, convert, compare, plan, launch slurm).

Config errors (unknown key, bad value, missing file) print one line and exit with code 2
before any rank starts or any model is built.
"""

from __future__ import annotations

import argparse
import sys

from trb_nemo.config.schema import ConfigError

EXIT_CONFIG_ERROR = 2


def _command(name: str):
    """The handler of subcommand ``name``: ``trb_nemo.commands.<name>.main``, imported when
    the subcommand runs (so a config error loads no torch and `--help` loads nothing)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(f"trb_nemo.commands.{name}").main(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trb-nemo", description="On-policy distillation with "
                                     "Trust-Region Behavior Blending on Megatron-Core.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="TRB warmup then pure OPD (default: the CPU toy run)",
                           description="Compose conf/<config-name>.yaml with a.b=c overrides and run.")
    train.add_argument("overrides", nargs="*", metavar="a.b=c",
                       help="NeMo/Hydra-style overrides, e.g. trb.eps0=0.05 parallel=cpu_tp1")
    train.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    train.add_argument("--config-dir", default=None, help="folder holding train.yaml (default: conf/)")
    train.add_argument("--config-name", default="train", help="top-level YAML name (default: train)")
    train.set_defaults(func=_command("train"))

    evaluate = sub.add_parser("eval", help="pass@1 of a checkpoint or HF folder on the "
                              "evaluation sets (eval.source), without training",
                              description="Compose the config like `train` and evaluate the "
                              "student (trb_nemo/commands/eval.py): one row per set and their mean.")
    evaluate.add_argument("overrides", nargs="*", metavar="a.b=c",
                          help="e.g. eval.source=[math500:test.parquet,aime24.jsonl] "
                          "eval.num_problems=0 eval.num_samples=16")
    evaluate.add_argument("--checkpoint", help="a checkpoint folder, or a run folder (or its "
                          "checkpoints/): its newest step_*; default: the config's student")
    evaluate.add_argument("--out", help="JSON file to write (default: eval_step_<N>.json in "
                          "the checkpoint's run folder, else eval.json in the config's)")
    evaluate.add_argument("--config-dir", default=None, help="folder holding train.yaml "
                          "(default: conf/)")
    evaluate.add_argument("--config-name", default="train", help="top-level YAML name "
                          "(default: train)")
    evaluate.set_defaults(func=_command("eval"))

    convert = sub.add_parser("convert", help="HF safetensors <-> Megatron checkpoint "
                             "(Qwen3, Qwen2, Llama)")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("--hf-path", help="HF folder (config.json + *.safetensors) to import")
    convert.add_argument("--checkpoint", help="Megatron checkpoint folder to export, or a run "
                         "folder (or its checkpoints/): its newest step_* is exported")
    convert.add_argument("--out", required=True, help="new folder to write")
    convert.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the work")
    convert.add_argument("--pp", type=int, default=1, help="pipeline stages doing the work")
    convert.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                         help="dtype of the Megatron weights (export always writes fp32)")
    convert.set_defaults(func=_command("convert"))

    from trb_nemo.methods.table import METHOD_NAMES

    compare = sub.add_parser("compare", help="methods x seeds on the same config, with standard "
                             "errors and paired intervals against vanilla OPD: the paper's "
                             "Table 1")
    compare.add_argument("overrides", nargs="*", metavar="a.b=c", help="applied to every run")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--behaviors", "--methods", nargs="+", default=list(METHOD_NAMES),
                         choices=METHOD_NAMES, help="the methods (trb_nemo/methods/table.py)")
    compare.add_argument("--sweep", action="store_true", help="run each method's sweep from "
                         "the paper and report its best point (the paper's selection)")
    compare.set_defaults(func=_command("compare"))

    plan = sub.add_parser("plan", help="per-GPU peak memory of each phase (rollout, teacher "
                          "scoring, training, evaluation) of a config; exit 2 if one is over "
                          "parallel.gpu_memory_gb", description="Plans from the models' shapes "
                          "(config.json, checkpoint metadata or the inline fields): nothing loads.")
    plan.add_argument("overrides", nargs="*", metavar="a.b=c", help="e.g. recipe=paper_qwen3_1.7b")
    plan.add_argument("--world-size", type=int, default=None, help="ranks of the job (default: "
                      "launcher.nodes x GPUs per node on nccl, the local ranks on gloo)")
    plan.set_defaults(func=_command("plan"))

    launch = sub.add_parser("launch", help="submit the run to a cluster scheduler")
    launch_sub = launch.add_subparsers(dest="scheduler", required=True)
    slurm = launch_sub.add_parser("slurm", help="render sbatch script(s) and submit them",
                                  description="Keys under launcher.* set the job; every override "
                                  "also reaches the trainer verbatim.")
    slurm.add_argument("overrides", nargs="*", metavar="a.b=c")
    slurm.add_argument("--dry-run", action="store_true", help="write and print the script(s) and "
                       "the sbatch commands that would submit them; submit nothing")
    slurm.set_defaults(func=_command("slurm"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # `eval --checkpoint X a.b=c`: overrides after an option
        if args.command != "eval" or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides += rest
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"trb-nemo: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
