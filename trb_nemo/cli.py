"""`trb-nemo`: the command line. Subcommands: train (more arrive with their features).

Config errors (unknown key, bad value, missing file) print one line and exit with code 2
before any rank starts or any model is built.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from trb_nemo.config.schema import ConfigError

EXIT_CONFIG_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from trb_nemo.config.compose import compose_config, to_typed

    node = compose_config(args.overrides, config_name=args.config_name, config_dir=args.config_dir)
    cfg = to_typed(node)
    if args.cfg == "job":
        print(OmegaConf.to_yaml(node, resolve=True), end="")
        return 0
    from trb_nemo.train.entry import run_train  # imports torch: only after the config is valid

    run_train(cfg)
    return 0


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
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"trb-nemo: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
