"""Prompt sources: the embedded toy task, or a JSONL / Parquet file of prompts with reference
answers; and the evaluation sets pass@1 is measured on.

A source hands out, for training step k, the same prompts on every rank of a model-parallel
group (data-parallel ranks get disjoint shares), and its evaluation sets (``eval_sets``).
Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would
have seen.

Files. The format comes from the suffix: ``.jsonl`` (or ``.json``), one JSON object per line,
or ``.parquet``. A row's fields are found by ``data.prompt_key`` / ``data.answer_key`` (dotted
paths into nested records, ``|`` between alternatives: see :class:`DataConfig`). A prompt is a
string, or a list of chat messages (``{"role": ..., "content": ...}`` or ``{"from": ...,
"value": ...}``) whose first user turn (role/from ``user`` or ``human``) gives the text. The
text becomes ids with the student's HF tokenizer (``data.system_prompt`` put before it, or
with ``data.chat_template`` the tokenizer's chat template: system message, user message,
generation prompt); a student without ``hf_path`` whose vocabulary is the toy models' uses the
toy task's character tokenizer and exact checker, so files of toy problems work with the toy
models. Answers are checked with math-verify (:mod:`trb_nemo.data.answers`).

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

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data import toy_math

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
USER_ROLES = ("user", "human")
"""Chat-message roles (``role`` or ``from``) whose first turn is the prompt."""


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


# ------------------------------------------------------------------------- text -> token ids


class ToyText:
    """The toy task's character tokenizer and exact checker, for prompt files of the toy
    models (a student without ``hf_path``)."""

    chat_template = False

    def __init__(self, system_prompt: str):
        self.tokenizer = toy_math.CharTokenizer()
        self.system_prompt = system_prompt

    def encode_all(self, texts: list[str], where: list[str], key: str) -> list[list[int]]:
        out = []
        for text, at in zip(texts, where, strict=True):
            try:
                out.append(self.tokenizer.encode(self.system_prompt + text))
            except ValueError as e:
                raise ConfigError(key, f"{at}: {e} (without model.student.hf_path prompts are "
                                  "tokenized with the toy task's character tokenizer)") from None
        return out

    def answer_problem(self, answer: str) -> str | None:
        return None if answer.isdigit() else f"the toy checker needs an integer, got {answer!r}"

    def check(self, response_ids, answer: str) -> bool:
        return toy_math.check(self.tokenizer.decode(response_ids), int(answer))


class HFText:
    """The student's HF tokenizer; answers checked with math-verify."""

    def __init__(self, tokenizer, folder: str, system_prompt: str, chat_template: bool):
        self.tokenizer, self.system_prompt, self.chat_template = tokenizer, system_prompt, chat_template
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.chat_template", f"is true, but the tokenizer in {folder!r} has "
                              "no chat template; set data.chat_template=false (data.system_prompt "
                              "is then put before each prompt)")

    def render(self, text: str) -> str:
        """The chat-template text of one prompt (``chat_template`` true)."""
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt
                    else []) + [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def encode_all(self, texts: list[str], where: list[str], key: str) -> list[list[int]]:
        if not texts:
            return []
        if self.chat_template:  # the template writes the special tokens itself
            return self.tokenizer([self.render(t) for t in texts],
                                  add_special_tokens=False)["input_ids"]
        return self.tokenizer([self.system_prompt + t for t in texts])["input_ids"]

    def answer_problem(self, answer: str) -> str | None:
        from trb_nemo.data.answers import reference_text

        return None if reference_text(answer) else f"no answer in {answer!r}"

    def check(self, response_ids, answer: str) -> bool:
        from trb_nemo.data.answers import math_answer_matches

        return math_answer_matches(self.tokenizer.decode(list(response_ids)), answer)


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


def text_encoder(cfg: TrainConfig, key: str = "data.source") -> ToyText | HFText:
    """How file prompts become ids: the student's HF tokenizer, or, for a student without
    ``hf_path`` whose vocabulary is the toy models', the toy character tokenizer."""
    d, student = cfg.data, cfg.model.student
    if student.hf_path is not None:
        return HFText(load_tokenizer(student.hf_path), student.hf_path, d.system_prompt,
                      d.chat_template)
    if student.vocab_size != toy_math.VOCAB_SIZE:
        raise ConfigError(key, "a prompt file needs the student's tokenizer: set "
                          "model.student.hf_path (or use toy_math)")
    if d.chat_template:
        raise ConfigError("data.chat_template", "is true, but a student without "
                          "model.student.hf_path uses the toy task's character tokenizer, which "
                          "has no chat template; set data.chat_template=false")
    return ToyText(d.system_prompt)


# --------------------------------------------------------------------------------- reading files

_MISSING = object()


def _lookup(row, path: str):
    if isinstance(row, dict) and path in row:  # a flat column that has a dot in its name
        return row[path]
    node = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and re.fullmatch(r"-?\d+", part) \
                and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def field_of(row, key: str):
    """The value at ``key`` (dotted path, ``|`` between alternatives: the first one the row has
    with a non-null value); ``_MISSING`` when none."""
    for path in key.split("|"):
        value = _lookup(row, path.strip())
        if value is not _MISSING and value is not None:
            return value
    return _MISSING


def _fields_here(row: dict, columns: list[str] | None) -> str:
    names = columns if columns is not None else list(row)
    return ", ".join(map(repr, names)) or "none"


def prompt_text(value) -> str | None:
    """The prompt text of a field value: a string, or the first user turn of chat messages;
    None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for m in value:
            if m.get("role", m.get("from")) in USER_ROLES:
                text = m.get("content", m.get("value"))
                return text if isinstance(text, str) else None
    return None


def file_format(path: str, key: str) -> str:
    """``jsonl`` or ``parquet`` from the suffix; ConfigError(key) for a missing file or another
    suffix."""
    file = Path(path)
    if not file.is_file():
        what = "neither toy_math nor a file" if key in ("data.source", "eval.source") else \
            "not a file"
        raise ConfigError(key, f"{path!r} is {what}")
    suffix = file.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ConfigError(key, f"{path}: unknown format {suffix or '(no suffix)'!r}; use a .jsonl "
                      "(one JSON object per line) or .parquet file")


def read_rows(path: str, key: str, fields: Sequence[str] = ()) -> tuple[list[tuple[str, dict]],
                                                                        list[str] | None]:
    """(where, row) of every row of a JSONL or Parquet file (``where``: ``p.jsonl:3``, line 3,
    or ``p.parquet row 2``, 0-based), and a Parquet file's columns (None for JSONL). A Parquet
    file is read for the columns ``fields`` (keys: dotted paths with ``|``) need only.
    ConfigError(key) for a file that does not parse."""
    if file_format(path, key) == "parquet":
        return _parquet_rows(path, key, fields)
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        raise ConfigError(key, f"{path} is one JSON array, not JSONL: write one JSON "
                          "object per line (e.g. jq -c '.[]' in.json > prompts.jsonl)")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(key, f"{path}:{number}: a JSON {type(row).__name__}, not an object")
        rows.append((f"{path}:{number}", row))
    return rows, None


def _parquet_rows(path: str, key: str, fields: Sequence[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        wanted = {n for k in fields for alt in k.split("|") for n in names
                  if alt.strip() == n or alt.strip().split(".")[0] == n}
        if wanted:
            rows = file.read(columns=[n for n in names if n in wanted]).to_pylist()
        else:  # no column the keys name: every row lacks them
            rows = [{} for _ in range(file.metadata.num_rows)]
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(key, f"{path} does not read as Parquet: {first}") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)], names


def count_rows(path: str) -> int | None:
    """Rows of a JSONL or Parquet file, cheaply (no parsing); None if it does not read."""
    try:
        if Path(path).suffix.lower() in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        return sum(1 for line in Path(path).read_text().splitlines() if line.strip())
    except Exception:  # noqa: BLE001 - the pre-flight says what is wrong with it
        return None


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
        if value is _MISSING:
            raise ConfigError(pk_name, f"{where}: no field {pk!r} (the prompt); fields here: "
                              f"{_fields_here(row, columns)}")
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
        if answer is _MISSING:
            raise ConfigError(ak_name, f"{where}: no field {ak!r} (the reference answer rollout "
                              "rewards and pass@1 are scored against); fields here: "
                              f"{_fields_here(row, columns)}")
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
        return [self._prompt(toy_math.problem(self.seed + toy_math.EVAL_SEED_OFFSET, i))
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
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
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
