"""Text -> token ids, and the answer checker that goes with each tokenizer: the student's HF
tokenizer (math-verify answers, :mod:`trb_nemo.data.answers`) or, for the toy models, the toy
task's character tokenizer and exact checker. Tokenizer problems are ConfigErrors naming the key.
"""

from __future__ import annotations

from pathlib import Path

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data import toy_math


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
