"""Prompt sources: the embedded toy task, or a JSONL file of prompts with reference answers.

A source hands out, for training step k, the same prompts on every rank of a model-parallel
group (data-parallel ranks get disjoint shares), and a fixed held-out evaluation set. Batches
are a pure function of (seed, step), so a resumed run sees exactly the data it would have seen.
Everything is validated when the source is built (before any model exists): an empty or
malformed file, a file that is one JSON array, a missing prompt or answer key, or a prompt
longer than ``data.max_prompt_length`` is a ConfigError naming the line; a student folder
without tokenizer files is a ConfigError naming ``model.student.hf_path``.
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
        text = file.read_text()
        if text.lstrip().startswith("["):
            raise ConfigError("data.source", f"{path} is one JSON array, not JSONL: write one JSON "
                              "object per line (e.g. jq -c '.[]' in.json > prompts.jsonl)")
        self.tokenizer, self.items = tokenizer, []
        for number, line in enumerate(text.splitlines(), start=1):
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
            if row.get(d.answer_key) is None:
                raise ConfigError("data.answer_key", f"{path}:{number}: no field "
                                  f"{d.answer_key!r} (the reference answer rollout rewards and "
                                  "pass@1 are scored against); fields here: "
                                  f"{', '.join(map(repr, row)) or 'none'}")
            self.items.append(Prompt(ids, str(row[d.answer_key])))
        if not self.items:
            raise ConfigError("data.source", f"{path!r} has no prompts")
        self.seed = d.seed
        self.n_eval = held_out(len(self.items), cfg.eval.num_problems)

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


def held_out(n_items: int, num_problems: int) -> int:
    """Problems a JSONL file holds out for pass@1: its first tenth (at least 1), at most
    ``eval.num_problems``."""
    return min(num_problems, max(1, n_items // 10))


def evaluated_problems(cfg: TrainConfig) -> int | None:
    """Problems each evaluation samples (cheap: counts the file's lines); None if unreadable."""
    if cfg.data.source == "toy_math":
        return cfg.eval.num_problems
    try:
        n = sum(1 for line in Path(cfg.data.source).read_text().splitlines() if line.strip())
    except OSError:
        return None
    return held_out(n, cfg.eval.num_problems)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""One of these makes a folder hold a tokenizer (the rest of an HF tokenizer is configuration)."""


def load_tokenizer(folder: str, key: str = "model.student.hf_path"):
    """The HF tokenizer of ``folder``; ConfigError(key) when it has none (``transformers`` would
    otherwise build an empty one from config.json that encodes every prompt to nothing)."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(key, f"{folder!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
                          "; prompts are tokenized with the student's: copy the tokenizer files "
                          "of the model it came from into that folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any loading failure is the folder's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(key, f"the tokenizer in {folder!r} does not load: {first}") from None


def build_source(cfg: TrainConfig):
    """The configured prompt source (ConfigError for bad input, before any model is built)."""
    if cfg.data.source == "toy_math":
        return ToyMathSource(cfg.data.seed, cfg.data.max_prompt_length)
    if cfg.model.student.hf_path is None:
        raise ConfigError("data.source", "a JSONL prompt file needs the student's tokenizer: set "
                          "model.student.hf_path (or use data.source=toy_math)")
    return JsonlSource(cfg.data.source, load_tokenizer(cfg.model.student.hf_path), cfg)


def step_prompts(source, step: int, prompts_per_step: int, dp_rank: int, dp_size: int) -> list[Prompt]:
    """This data-parallel rank's share of step ``step``'s prompts."""
    share = prompts_per_step // dp_size
    first = step * prompts_per_step + dp_rank * share
    return [source.train_prompt(first + i) for i in range(share)]
