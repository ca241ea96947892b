"""The sampler's row kernel compiled (torch.compile, C++ on this CPU) draws the same ids as the
eager kernel and as the pre-kernel formula (counter-based uniforms, Gumbel-max, ties to the
lowest id): random rows at several vocabulary sizes (one below and several not a multiple of
the vector width), padded vocabularies, bf16/fp32/fp64, stride-0 rows, the generator path.

The first test pays for compiling (seconds per variant on 2 cores).
Run: .venv/bin/python -m pytest tests/unit/test_sampling_fused.py
"""

import math

import pytest
import torch

from trb_nemo.ops import fused, sampling
from trb_nemo.ops.sampling import RowNoise, sample

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def compiled_kernels():
    fused.set_mode("on")
    yield
    fused.set_mode("auto")


def _noise(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return RowNoise(seed * 7919 - 2**40, torch.randint(0, 2**40, (rows,), generator=g),
                    torch.randint(0, 2**31, (rows,), generator=g))


def _reference(x_RV, noise, vocab_size):
    """The pre-kernel formula, eagerly on all rows at once."""
    v = x_RV.shape[-1]
    u = sampling._uniform(noise.row_keys(), noise.counter_R, torch.arange(v))
    x = x_RV.float()
    if vocab_size is not None:
        x = x.masked_fill(torch.arange(v) >= vocab_size, -math.inf)
    return (x.double() - u.log().neg().log()).argmax(-1)


def _both_modes(fn):
    """(compiled result, eager result); asserts the compiled kernel really ran compiled."""
    fused.set_mode("on")
    compiled = fn()
    assert fused.is_fused(CPU), "the sampler kernel fell back to eager"
    fused.set_mode("off")
    return compiled, fn()


@pytest.mark.parametrize("rows,v,vocab_size,dtype", [
    (3000, 7, None, torch.float64),
    (3000, 37, 33, torch.float32),
    (1000, 1000, 990, torch.float32),
    (200, 4099, 4000, torch.bfloat16),
    (8, 151936, 151665, torch.bfloat16),
], ids=["v7-fp64", "v37-padded", "v1000-padded", "v4099-bf16-padded", "qwen-vocab"])
def test_compiled_draws_equal_eager_and_the_formula(rows, v, vocab_size, dtype):
    g = torch.Generator().manual_seed(v)
    x = (torch.randn(rows, v, generator=g) * 3).to(dtype)
    noise = _noise(rows, v)
    compiled, eager = _both_modes(lambda: sample(x, noise=noise, vocab_size=vocab_size))
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, _reference(x, noise, vocab_size))
    if vocab_size is not None:
        assert torch.all(compiled < vocab_size)


def test_ties_go_to_the_lowest_id_and_peaked_rows():
    rows, v = 500, 129
    x = torch.full((rows, v), -math.inf)
    x[:, 5] = 0.0  # one finite column: always drawn
    x[: rows // 2, 100] = 1e30  # overwhelming: always drawn
    noise = _noise(rows, 3)
    compiled, eager = _both_modes(lambda: sample(x, noise=noise))
    assert torch.equal(compiled, eager)
    assert torch.all(eager[: rows // 2] == 100) and torch.all(eager[rows // 2:] == 5)


def test_stride_zero_rows_and_the_generator_path():
    row = torch.randn(1, 300, generator=torch.Generator().manual_seed(2))
    x = row.expand(2000, 300)  # many draws of one prefix, as the chi-square tests do

    def draw():
        return sample(x, generator=torch.Generator().manual_seed(9), vocab_size=290)

    compiled, eager = _both_modes(draw)
    assert torch.equal(compiled, eager)
    assert len(set(eager.tolist())) > 50


def test_draws_are_pinned():
    """Ids drawn by the formula before the kernel existed: the uniforms and tie rule stay."""
    r, c = torch.arange(12.0).unsqueeze(-1), torch.arange(50.0)
    x = torch.sin(r * 13 + c * 0.7) * 2
    noise = RowNoise(2024, torch.arange(12) * 3 + 1, torch.arange(12) * 5)
    for mode in ("on", "off"):
        fused.set_mode(mode)
        assert sample(x, noise=noise, vocab_size=47).tolist() == [
            12, 27, 2, 17, 44, 7, 34, 33, 33, 33, 32, 4]
        assert sample(x, noise=noise.stream(11), vocab_size=47).tolist() == [
            38, 10, 18, 19, 27, 33, 0, 6, 32, 23, 23, 23]


def test_bad_rows_are_reported_alike():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    x[1, 7] = math.nan
    x[2] = -math.inf
    x[3, 5] = math.inf
    noise = _noise(4, 1)
    for row in range(4):
        one = RowNoise(noise.key, noise.ids_R[row:row + 1], noise.counter_R[row:row + 1])
        for mode in ("on", "off"):
            fused.set_mode(mode)
            if row == 0:
                assert sample(x[:1], noise=one).shape == (1,)
            else:
                with pytest.raises(ValueError, match="sample: a row has no finite"):
                    sample(x[row:row + 1], noise=one)
