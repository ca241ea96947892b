"""What the user sees during a run: a progress bar with live metrics, a JSONL file and
TensorBoard events (global rank 0 only; other ranks write nothing).

``<run folder>/metrics.jsonl`` holds one object per training step (``{"step": k, ...}``) and one
per evaluation (``{"step": k, "eval/pass@1": ...}``). On resume, lines of steps at or after the
resumed step are dropped first, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trb_nemo.config.schema import LoggingConfig
from trb_nemo.logs import global_rank
from trb_nemo.train.run_dir import RunFolder

BAR_KEYS = (("eps", "rollout/eps"), ("beta", "rollout/beta_mean"),
            ("accept", "rollout/draft_acceptance"), ("loss", "train/loss"),
            ("reward", "rollout/reward"), ("tok/s", "rollout/tokens_per_second"),
            ("pass@1", "eval/pass@1"))
STEP_ONLY_BAR_KEYS = ("accept",)
"""Shown only while the step's rollout reports them (speculative drafts: the TRB warmup)."""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, run: RunFolder, cfg: LoggingConfig, total_steps: int, start_step: int):
        self.enabled = global_rank() == 0
        self.path = run.metrics
        self.cfg, self.bar, self.tb, self.live = cfg, None, None, {}
        if not self.enabled:
            return
        run.path.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if r["step"] < start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard), purge_step=start_step)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="trb-nemo", unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict, advance: bool = False) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in metrics.items() if _finite(v)}}
        if self.cfg.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        self.live.update({short: row[key] for short, key in BAR_KEYS if key in row})
        if "rollout/tokens" in row:  # a step's row: drop what this step did not report
            for short, key in BAR_KEYS:
                if short in STEP_ONLY_BAR_KEYS and key not in row:
                    self.live.pop(short, None)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in self.live.items()}, refresh=False)
            if advance:
                self.bar.update(1)
            else:
                self.bar.refresh()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _finite(v) -> bool:
    if isinstance(v, list):  # e.g. eval/correct_per_problem (the paired comparison's input)
        return all(_finite(x) for x in v)
    return isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)) or isinstance(v, str)
