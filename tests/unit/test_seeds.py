"""The named seed streams (trb_nemo/seeds.py) give exactly the values of the formulas they
replaced, so checkpoints saved before the streams had a home still resume bit for bit: the old
formulas are written out here as they stood in the trainer, the evaluation, the file source, the
toy task and the HF initializer."""

import random
import zlib

import torch

from trb_nemo import seeds
from trb_nemo.data import toy_math
from trb_nemo.models.hf_weights import random_hf_tensor

SEEDS = [0, 1, 7, 12345, 2**31 - 1]


def test_rollout_stream_is_the_trainers_old_formula():
    for seed in SEEDS:
        for step in (0, 1, 19, 20, 999):
            assert seeds.rollout(seed, step) == seed * 1_000_003 + step * 1009 + 1


def test_evaluation_stream_is_pass_at_1s_old_formula():
    for seed in SEEDS:
        for step in (0, 20, 100):
            for dp_rank in (0, 1, 7):
                assert (seeds.evaluation(seed, step, dp_rank)
                        == seed * 1_000_003 + 7 * step + 1_000_000 * dp_rank + 5)


def test_epoch_and_toy_streams_are_the_old_formulas():
    for seed in SEEDS:
        for i in (0, 1, 5, 10_000):
            assert seeds.epoch_order(seed, i) == seed * 1_000_003 + i
            assert seeds.toy_problem(seed, i) == seed * 1_000_003 + i
    assert seeds.TOY_HELD_OUT == 7919
    # the toy task's problems themselves: the old draw, value for value
    for stream in (0, 7919, 3):
        for index in range(20):
            rng = random.Random(stream * 1_000_003 + index)
            old = tuple(rng.randint(1, 9) for _ in range(toy_math.TERMS))
            assert toy_math.problem(stream, index).terms == old


def test_init_tensor_stream_is_the_initializers_old_formula():
    for seed in SEEDS:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            assert seeds.init_tensor(seed, name) == seed * 1_000_003 + zlib.crc32(name.encode())
    # and the tensor drawn from it is the one the old generator gave
    name = "model.layers.0.mlp.up_proj.weight"
    gen = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(name.encode()))
    got = random_hf_tensor(name, (8, 4), seed=3)
    assert torch.equal(got, torch.randn((8, 4), generator=gen) * 0.02)
