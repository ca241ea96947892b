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


WORDS = "what is one two three four plus minus".split()


def make_hf(folder: Path, *, vocab_size=160, hidden_size=48, layers=2, max_positions=384,
            eos=5, generation_eos=None, pad=4, tokenizer=True, weights=True) -> str:
    """A tiny Qwen3 HF folder: config.json, generation_config.json (when ``generation_eos``),
    a word-level tokenizer ``transformers`` loads and (``weights``) a ``model.safetensors``
    (a placeholder: the pre-flight checks the weights are there; no rank starts here)."""
    import transformers

    folder.mkdir(parents=True)
    transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=max_positions, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"],
    ).save_pretrained(folder)
    if generation_eos is not None:
        transformers.GenerationConfig(eos_token_id=generation_eos).save_pretrained(folder)
    if tokenizer:
        write_word_tokenizer(folder, WORDS)
    if weights:
        write_placeholder_weights(folder)
    return str(folder)
