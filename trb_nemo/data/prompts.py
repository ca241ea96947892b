"""Prompt sources and evaluation sets: the embedded toy task, or a JSONL / Parquet file of
prompts with reference answers; and the evaluation sets pass@1 is measured on.

A source hands out, for training step k, the same prompts on every rank of a model-parallel
group (data-parallel ranks get disjoint shares), and its evaluation sets (``eval_sets``).
Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would
have seen.

Files are read by :mod:`trb_nemo.data.files` (the format from the suffix, fields by
``data.prompt_key`` / ``data.answer_key``; a prompt is a string or chat messages whose first user
turn gives the text) and become ids with :mod:`trb_nemo.data.text` (the student's HF tokenizer,
or the toy task's character tokenizer for the toy models). Answers are checked with math-verify
(:mod:`trb_nemo.data.answers`).

Evaluation. With ``eval.source`` null, pass@1 is measured on the source's held-out problems:
the toy task's held-out stream, or a file's first tenth (at most ``eval.num_problems``), which
then does not train. With ``eval.source`` set, on each listed set (the first
``eval.num_problems`` problems of each; 0 = all), and the whole ``data.source`` trains.

Everything is validated when a source is built, before any model exists: a missing file, an
unknown suffix, a file that does not parse (a JSON line, a file that is one JSON array, a
Parquet file), an empty file, a missing field, a prompt that is neither a string nor chat
messages, an answer that is neither a string nor a number, or a prompt longer than
``data.max_prompt_length`` is a ConfigError naming the key and the row (``p.jsonl:3`` is line
3 of a JSONL file, ``p.parquet row 2`` the 0-based row of a Parquet file); a student folder
without tokenizer files is a ConfigError naming ``model.student.hf_path``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trb_nemo import seeds
from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data import toy_math
from trb_nemo.data.files import (
    MISSING,
    count_rows,
    field_of,
    fields_here,
    file_format,
    files_digest,
    prompt_text,
    read_rows,
)
from trb_nemo.data.text import HFText, ToyText, text_encoder


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    answer: str | None
    """Reference answer (checked by the source's checker); None for training prompts read
    without answers (``data.answer_key`` null)."""


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: its problems and the checker of their answers."""

    name: str
    """Its metrics are ``eval/<name>/pass@1``."""
    source: str
    """What it was read from (a path, ``toy_math``, or the held-out part of data.source)."""
    prompts: list[Prompt]
    check: Callable[[Sequence[int], str], bool] = field(repr=False)
    """(response ids, reference answer) -> correct."""


def read_prompts(path: str, encoder: ToyText | HFText, max_prompt_length: int, *,
                 source_key: str, prompt_key: tuple[str, str], answer_key: tuple[str, str | None],
                 limit: int | None = None, skipped: list | None = None) -> list[Prompt]:
    """The prompts of a file, each checked (module docstring); ``limit`` = its first rows only.
    ``prompt_key``/``answer_key`` are (config key, value): errors name the config key; an
    answer key None reads no answers (``Prompt.answer`` None). With a ``skipped`` list, a
    prompt longer than ``max_prompt_length`` is left out and its row appended there instead
    of stopping."""
    (pk_name, pk), (ak_name, ak) = prompt_key, answer_key
    rows, columns = read_rows(path, source_key, (pk,) if ak is None else (pk, ak))
    rows = rows[:limit]
    if not rows:
        raise ConfigError(source_key, f"{path!r} has no prompts")
    texts = []
    for where, row in rows:
        value = field_of(row, pk)
        if value is MISSING:
            raise ConfigError(pk_name, f"{where}: no field {pk!r} (the prompt); fields here: "
                              f"{fields_here(row, columns)}")
        text = prompt_text(value)
        if text is None:
            what = ("a list without a user turn (a message with role or from 'user' or "
                    "'human' and a string content or value)" if isinstance(value, list) else
                    f"of type {type(value).__name__}, not a string or a list of chat messages")
            raise ConfigError(pk_name, f"{where}: field {pk!r} is {what}")
        texts.append(text)
    ids_all = encoder.encode_all(texts, [w for w, _ in rows], pk_name)
    items = []
    for (where, row), ids in zip(rows, ids_all, strict=True):
        if len(ids) > max_prompt_length and skipped is not None:
            skipped.append(where)
            continue
        if len(ids) > max_prompt_length:
            raise ConfigError("data.max_prompt_length", f"{where}: prompt has {len(ids)} tokens, "
                              f"more than {max_prompt_length}; raise it or shorten the prompt")
        if not ids:
            raise ConfigError(source_key, f"{where}: empty prompt")
        if ak is None:
            items.append(Prompt(tuple(ids), None))
            continue
        answer = field_of(row, ak)
        if answer is MISSING:
            raise ConfigError(ak_name, f"{where}: no field {ak!r} (the reference answer rollout "
                              "rewards and pass@1 are scored against); fields here: "
                              f"{fields_here(row, columns)}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ConfigError(ak_name, f"{where}: field {ak!r} is of type "
                              f"{type(answer).__name__}, not a string or a number")
        problem = encoder.answer_problem(str(answer))
        if problem is not None:
            raise ConfigError(ak_name, f"{where}: field {ak!r}: {problem}")
        items.append(Prompt(tuple(ids), str(answer)))
    return items


# ------------------------------------------------------------------------------------- sources


class ToyMathSource:
    """The built-in arithmetic task with its character tokenizer and exact checker."""

    name = "toy_math"

    def __init__(self, seed: int, max_prompt_length: int):
        self.tokenizer = toy_math.CharTokenizer()
        self.seed = seed
        self.eval_sets: list[EvalSet] = []
        longest = len(toy_math.problem(0, 0).prompt)
        if longest > max_prompt_length:
            raise ConfigError("data.max_prompt_length", f"toy prompts have {longest} tokens; "
                              f"must be >= {longest}, got {max_prompt_length}")

    def _prompt(self, p: toy_math.Problem) -> Prompt:
        return Prompt(tuple(self.tokenizer.encode(p.prompt)), str(p.answer))

    def train_prompt(self, index: int) -> Prompt:
        return self._prompt(toy_math.problem(self.seed, index))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(toy_math.problem(self.seed + seeds.TOY_HELD_OUT, i))
                for i in range(n)]

    def check(self, response_ids, answer: str) -> bool:
        return toy_math.check(self.tokenizer.decode(response_ids), int(answer))


class FileSource:
    """The prompts of a JSONL or Parquet file (``data.*`` keys), in a seeded order per epoch;
    its first tenth (at most ``eval.num_problems``) held out when ``hold_out``."""

    def __init__(self, path: str, encoder: ToyText | HFText, cfg: TrainConfig, hold_out: bool):
        d = cfg.data
        self.name = Path(path).stem
        self.encoder, self.seed, self.eval_sets = encoder, d.seed, []
        if hold_out and d.answer_key is None:
            raise ConfigError("data.answer_key", "is null (prompts without answers), so pass@1 "
                              "cannot use the held-out part of data.source: name evaluation "
                              "sets with eval.source, or set data.answer_key")
        self.skipped: list[str] = []
        self.items = read_prompts(path, encoder, d.max_prompt_length, source_key="data.source",
                                  prompt_key=("data.prompt_key", d.prompt_key),
                                  answer_key=("data.answer_key", d.answer_key),
                                  skipped=self.skipped if d.skip_long_prompts else None)
        if not self.items:
            raise ConfigError("data.max_prompt_length", f"every prompt of {path!r} is longer than "
                              f"{d.max_prompt_length} tokens")
        self.n_eval = held_out(len(self.items), cfg.eval.num_problems) if hold_out else 0
        self._train = self.items[self.n_eval:] or self.items
        self._epoch_order: tuple[int, list[int]] | None = None

    def train_prompt(self, index: int) -> Prompt:
        epoch, offset = divmod(index, len(self._train))
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # once per epoch
            order = list(range(len(self._train)))
            random.Random(seeds.epoch_order(self.seed, epoch)).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._train[self._epoch_order[1][offset]]

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self.items[: min(n, self.n_eval)]

    def check(self, response_ids, answer: str) -> bool:
        return self.encoder.check(response_ids, answer)


def held_out(n_items: int, num_problems: int) -> int:
    """Problems a prompt file holds out for pass@1 when ``eval.source`` is null: its first tenth
    (at least 1), at most ``eval.num_problems``."""
    return min(num_problems, max(1, n_items // 10))


# ------------------------------------------------------------------------------ evaluation sets


def eval_entries(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(name, path or ``toy_math``) of each ``eval.source`` entry (``NAME:PATH`` names a set,
    else the file stem does); ConfigError for two sets of one name."""
    out: list[tuple[str, str]] = []
    for entry in cfg.eval.source or ():
        m = re.fullmatch(r"([\w.-]+):(.+)", entry)
        if entry == "toy_math" or Path(entry).exists() or m is None:
            name, path = ("toy_math" if entry == "toy_math" else Path(entry).stem), entry
        else:
            name, path = m.group(1), m.group(2)
        clash = next((p for n, p in out if n == name), None)
        if clash is not None:
            raise ConfigError("eval.source", f"two sets named {name!r} ({clash}, {path}); name "
                              "them apart with NAME:PATH, e.g. math500:test.parquet")
        out.append((name, path))
    return out


def build_eval_sets(cfg: TrainConfig, source=None,
                    encoder: ToyText | HFText | None = None) -> list[EvalSet]:
    """The evaluation sets (module docstring), each read and checked now. ``source``: the
    training source (its held-out problems when eval.source is null; built here if None);
    ``encoder``: the text encoder to reuse (built here when a file needs one)."""
    e = cfg.eval
    if e.source is None:
        if e.samples_per_set:
            raise ConfigError("eval.samples_per_set", "names sets of eval.source, which is null "
                              "(the held-out set takes eval.num_samples)")
        source = source if source is not None else _train_source(cfg, encoder)
        where = "toy_math" if cfg.data.source == "toy_math" else \
            f"held-out part of {cfg.data.source}"
        return [EvalSet(source.name, where, source.eval_prompts(e.num_problems), source.check)]
    entries = eval_entries(cfg)
    unknown = sorted(set(e.samples_per_set) - {name for name, _ in entries})
    if unknown:
        raise ConfigError("eval.samples_per_set", f"{', '.join(unknown)}: no evaluation set of "
                          f"that name (sets: {', '.join(n for n, _ in entries)})")
    sets = []
    for name, path in entries:
        if path == "toy_math":
            toy = ToyMathSource(cfg.data.seed, cfg.data.max_prompt_length)
            sets.append(EvalSet(name, path, toy.eval_prompts(e.num_problems), toy.check))
            continue
        file_format(path, "eval.source")  # a missing file says so before a tokenizer loads
        encoder = encoder if encoder is not None else text_encoder(cfg, "eval.source")
        prompts = read_prompts(
            path, encoder, cfg.data.max_prompt_length, source_key="eval.source",
            prompt_key=("eval.prompt_key" if e.prompt_key else "data.prompt_key",
                        e.prompt_key or cfg.data.prompt_key),
            answer_key=_eval_answer_key(cfg),
            limit=e.num_problems or None)
        sets.append(EvalSet(name, path, prompts, encoder.check))
    return sets


def _eval_answer_key(cfg: TrainConfig) -> tuple[str, str]:
    """(config key, field) of the evaluation files' answers: ``eval.answer_key``, else
    ``data.answer_key``; ConfigError when neither names one."""
    if cfg.eval.answer_key:
        return "eval.answer_key", cfg.eval.answer_key
    if cfg.data.answer_key is None:
        raise ConfigError("eval.answer_key", "evaluation sets need reference answers and "
                          "data.answer_key is null: set eval.answer_key to their field")
    return "data.answer_key", cfg.data.answer_key


def _train_source(cfg: TrainConfig, encoder: ToyText | HFText | None = None):
    if cfg.data.source == "toy_math":
        return ToyMathSource(cfg.data.seed, cfg.data.max_prompt_length)
    file_format(cfg.data.source, "data.source")  # a missing file says so before a tokenizer loads
    encoder = encoder if encoder is not None else text_encoder(cfg)
    return FileSource(cfg.data.source, encoder, cfg, hold_out=cfg.eval.source is None)


def build_source(cfg: TrainConfig):
    """The configured prompt source with its evaluation sets (``eval_sets``); ConfigError for
    bad input, before any model is built."""
    source = _train_source(cfg)
    source.eval_sets = build_eval_sets(cfg, source, getattr(source, "encoder", None))
    return source


def evaluated_problems(cfg: TrainConfig) -> int | None:
    """Problems each evaluation samples, over all sets (cheap: counts rows, reads no prompt);
    None if a file is unreadable."""
    e = cfg.eval
    if e.source is None:
        if cfg.data.source == "toy_math":
            return e.num_problems
        n = count_rows(cfg.data.source)
        return None if n is None else held_out(n, e.num_problems)
    total = 0
    for _, path in eval_entries(cfg):
        n = e.num_problems if path == "toy_math" else count_rows(path)
        if n is None:
            return None
        total += min(n, e.num_problems) if e.num_problems else n
    return total


def step_prompts(source, step: int, prompts_per_step: int, dp_rank: int, dp_size: int) -> list[Prompt]:
    """This data-parallel rank's share of step ``step``'s prompts."""
    share = prompts_per_step // dp_size
    first = step * prompts_per_step + dp_rank * share
    return [source.train_prompt(first + i) for i in range(share)]


def data_fingerprint(cfg: TrainConfig) -> str | None:
    """:func:`~trb_nemo.data.files.files_digest` of the run's data files (``data.source`` and
    the ``eval.source`` files; the toy task has none): ``data.fingerprint``."""
    paths = [cfg.data.source] if cfg.data.source != "toy_math" else []
    paths += [path for _, path in eval_entries(cfg) if path != "toy_math"]
    return files_digest(paths)
