"""Prompt sources: the embedded toy task, or a JSONL file of prompts with reference answers.

A source hands out, for training step k, the same prompts on every rank of a model-parallel
group (data-parallel ranks get disjoint shares), and a fixed held-out evaluation set. Batches
are a pure function of (seed, step), so a resumed run sees exactly the data it would have seen.
Everything is validated when the source is built (before any model exists): an empty or
malformed file, a missing key, or a prompt longer than ``data.max_prompt_length`` is a
ConfigError naming the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data import toy_math


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    answer: str
    """Reference answer (checked by the source's checker)."""


class ToyMathSource:
    """The built-in arithmetic task with its character tokenizer and exact checker."""

    def __init__(self, seed: int, max_prompt_length: int):
        self.tokenizer = toy_math.CharTokenizer()
        self.seed = seed
        longest = len(toy_math.problem(0, 0).prompt)
        if longest > max_prompt_length:
            raise ConfigError("data.max_prompt_length", f"toy prompts have {longest} tokens; "
                              f"must be >= {longest}, got {max_prompt_length}")

    def _prompt(self, p: toy_math.Problem) -> Prompt:
        return Prompt(tuple(self.tokenizer.encode(p.prompt)), str(p.answer))

    def train_prompt(self, index: int) -> Prompt:
        return self._prompt(toy_math.problem(self.seed, index))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(toy_math.problem(self.seed + toy_math.EVAL_SEED_OFFSET, i))
                for i in range(n)]

    def check(self, response_ids, answer: str) -> bool:
        return toy_math.check(self.tokenizer.decode(response_ids), int(answer))


class JsonlSource:
    """One JSON object per line with ``data.prompt_key`` (and ``data.answer_key`` for eval),
    tokenized with the student's HF tokenizer; answers are checked with math-verify."""

    def __init__(self, path: str, tokenizer, cfg: TrainConfig):
        d = cfg.data
        file = Path(path)
        if not file.is_file():
            raise ConfigError("data.source", f"{path!r} is neither toy_math nor a file")
        self.tokenizer, self.items = tokenizer, []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.source", f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(d.prompt_key), str):
                raise ConfigError("data.prompt_key", f"{path}:{number}: no string field "
                                  f"{d.prompt_key!r}")
            ids = tuple(tokenizer.encode(d.system_prompt + row[d.prompt_key]))
            if len(ids) > d.max_prompt_length:
                raise ConfigError("data.max_prompt_length", f"{path}:{number}: prompt has "
                                  f"{len(ids)} tokens, more than {d.max_prompt_length}; raise it "
                                  "or shorten the prompt")
            if not ids:
                raise ConfigError("data.source", f"{path}:{number}: empty prompt")
            self.items.append(Prompt(ids, str(row.get(d.answer_key, ""))))
        if not self.items:
            raise ConfigError("data.source", f"{path!r} has no prompts")
        self.seed = d.seed
        self.n_eval = min(cfg.eval.num_problems, max(1, len(self.items) // 10))

    def train_prompt(self, index: int) -> Prompt:
        train = self.items[self.n_eval:] or self.items
        epoch, offset = divmod(index, len(train))
        order = list(range(len(train)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return train[order[offset]]

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self.items[: min(n, self.n_eval)]

    def check(self, response_ids, answer: str) -> bool:
        from trb_nemo.eval.checkers import math_answer_matches

        return math_answer_matches(self.tokenizer.decode(list(response_ids)), answer)


def build_source(cfg: TrainConfig):
    """The configured prompt source (ConfigError for bad input, before any model is built)."""
    if cfg.data.source == "toy_math":
        return ToyMathSource(cfg.data.seed, cfg.data.max_prompt_length)
    if cfg.model.student.hf_path is None:
        raise ConfigError("data.source", "a JSONL prompt file needs the student's tokenizer: set "
                          "model.student.hf_path (or use data.source=toy_math)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.student.hf_path)
    return JsonlSource(cfg.data.source, tokenizer, cfg)


def step_prompts(source, step: int, prompts_per_step: int, dp_rank: int, dp_size: int) -> list[Prompt]:
    """This data-parallel rank's share of step ``step``'s prompts."""
    share = prompts_per_step // dp_size
    first = step * prompts_per_step + dp_rank * share
    return [source.train_prompt(first + i) for i in range(share)]
