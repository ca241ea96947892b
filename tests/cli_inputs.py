"""Shared by the tests of one-line input errors through the CLI: a word-level HF tokenizer
`transformers` loads and the one-line error check (the ``no_ranks`` fixture is in conftest)."""

import json
from pathlib import Path

from trb_nemo.cli import EXIT_CONFIG_ERROR, main


def write_word_tokenizer(folder: Path, words: list[str]) -> None:
    """tokenizer.json + tokenizer_config.json of a word-level tokenizer over ``words``
    ([UNK] = 0, then the words from 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))


def one_line_error(capsys, argv) -> str:
    """Run the CLI: exit 2 with exactly one ``config error`` line on stderr; its reason."""
    assert main(argv) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("trb-nemo: config error: "), err
    return err[0].removeprefix("trb-nemo: config error: ")


def write_placeholder_weights(folder: Path) -> None:
    """A ``model.safetensors`` holding one placeholder tensor: the pre-flight checks an HF
    folder has its weights; tests that start no rank need no real ones."""
    import torch
    from safetensors.torch import save_file

    save_file({"placeholder": torch.zeros(1)}, str(Path(folder) / "model.safetensors"))
