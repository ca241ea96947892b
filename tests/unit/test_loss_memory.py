"""The loss path's memory, measured: forward + backward of ``prefix_kl`` on one logits shard L
[R, V] allocates the gradient dL (autograd must produce it) and at most one more L-sized buffer,
whatever the dtype: no EOS-canonical copy, no fp32 copy, fp32 work in row chunks.

Measured, not computed: torch.profiler with ``profile_memory=True`` records every CPU
allocation and free (size, address) while the loss runs; the highest total of what was
allocated in that time and not yet freed is the peak extra memory (the inputs exist before).
The gradient is allocated inside, so it is part of that peak. The old way (a canonical copy of the
logits, then the loss) is measured the same way and is over the bound.

Run: .venv/bin/python -m pytest tests/unit/test_loss_memory.py
"""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from trb_nemo.config.schema import LossConfig
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops import eos, fused, losses, vocab_parallel
from trb_nemo.ops.shards import ROW_CHUNK_BYTES
from trb_nemo.scoring.teacher import LossBatch
from trb_nemo.train.step import prefix_kl

ROWS, V, K = 256, 32768, 16
VOCAB = SharedVocab(size=V - 64, stop_id=7, other_stop_id=V - 100)
"""Padded vocabulary (Megatron's padding columns); the teacher's stop id merges onto id 7."""
CHUNK_TEMPORARIES = 8
"""fp32 row-chunk temporaries (ROW_CHUNK_BYTES each) the eager row passes may hold at once
(measured: 5 in the full KL's forward kernel, 2 in the top-k paths); [R]-sized statistics get
ROWS KiB on top."""


@pytest.fixture(autouse=True)
def eager_kernels():
    """The eager row passes (the CPU default; compiled ones hold no chunk temporaries at all)."""
    fused.set_mode("off")
    yield
    fused.set_mode("auto")


def _peak_bytes(fn, tmp_path) -> int:
    """Highest total of the CPU bytes allocated while ``fn`` runs and not yet freed: the
    profiler's memory events (each allocation and free with its address), in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = sorted((e["ts"], e["args"]["Addr"], e["args"]["Bytes"])
                    for e in json.loads(trace.read_text())["traceEvents"]
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    assert events, "the profiler recorded no CPU memory events"
    live, total, peak = {}, 0, 0
    for _, addr, size in events:
        if size > 0:
            live[addr] = size
            total += size
        else:  # a free (of what was allocated before fn ran too: not counted)
            total -= live.pop(addr, 0)
        peak = max(peak, total)
    return peak


def _batch(path, dtype):
    """Student logits [1, R, V] and the microbatch of ``path``: teacher logits (``full``,
    ``topk``, ``veto``), or the student's recorded top-16 ids with the teacher's log-probs there
    (``at_ids``, the common path in training), or the teacher's token (``sft``)."""
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(1, ROWS, V, generator=g) * 2).to(dtype)
    zt = (zs.float() + torch.randn(1, ROWS, V, generator=g)).to(dtype)
    zs[..., VOCAB.other_stop_id] += 8.0  # the student often ends on the teacher's stop id
    rows = dict(tokens=torch.zeros(1, ROWS, dtype=torch.long),
                loss_mask=torch.ones(1, ROWS, dtype=torch.bool), **KWARGS.get(path, {}))
    if path in ("full", "topk", "veto"):
        return zs, LossBatch(**rows, teacher_logits=zt)
    _, ids = torch.topk(eos.canonicalize(zs, keep_id=VOCAB.stop_id, drop_id=VOCAB.other_stop_id)
                        .float(), K, dim=-1)
    lq = vocab_parallel.logprobs_at(zt, ids, vocab_size=VOCAB.size, stop_ids=VOCAB.stop_ids)
    if path == "sft":
        return zs, LossBatch(**rows, target_ids=ids[..., :1])
    return zs, LossBatch(**rows, target_ids=ids, teacher_logprobs=lq)


CONFIGS = {"at_ids": LossConfig(kind="topk", topk=K), "full": LossConfig(kind="full"),
           "topk": LossConfig(kind="topk", topk=K), "veto": LossConfig(kind="topk"),
           "sft": LossConfig(kind="topk")}
KWARGS = {"veto": {"target": "veto", "veto_b": 0.4}, "sft": {"target": "sft"}}


def _loss_path(path, dtype, tmp_path, step=prefix_kl):
    """(peak bytes of forward + backward, bytes of the logits, loss [1, R], gradient)."""
    zs, mb = _batch(path, dtype)
    x = zs.detach().requires_grad_(True)
    out = []

    def forward_backward():
        out.append(step(x, mb, CONFIGS[path], VOCAB, None))
        out[0].sum().backward()

    peak = _peak_bytes(forward_backward, tmp_path)
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.abs().sum() > 0
    return peak, zs.numel() * zs.element_size(), out[0].detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("path", ["at_ids", "full", "topk", "sft"])
def test_loss_path_holds_the_gradient_and_at_most_one_more_logits_buffer(path, dtype, tmp_path):
    """Bound: peak <= dL + L (the gradient, which autograd must allocate, plus one logits-sized
    buffer), and what is beyond dL is row-chunk temporaries, so it does not grow with R."""
    peak, logits, _, _ = _loss_path(path, dtype, tmp_path)
    beyond_grad = peak - logits
    assert beyond_grad >= 0  # the gradient itself was allocated in the measured region
    assert peak <= 2 * logits, (path, peak / logits)
    assert beyond_grad <= CHUNK_TEMPORARIES * ROW_CHUNK_BYTES + ROWS * 1024, (path, beyond_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_veto_holds_its_target_logits_and_row_chunks(dtype, tmp_path):
    """Veto's target logits x = z_T + b sg(z_S) are one L-sized tensor (the one buffer the
    bound allows); beyond dL and x, only row-chunk temporaries."""
    peak, logits, _, _ = _loss_path("veto", dtype, tmp_path)
    assert peak <= 2 * logits + CHUNK_TEMPORARIES * ROW_CHUNK_BYTES + ROWS * 1024, peak / logits


def _old_prefix_kl(logits, mb, loss_cfg, vocab, group):
    """The loss path before: canonical copies of the logits, then the losses on them."""
    student = vocab.canonical(logits, group)
    kw = dict(vocab_group=group, vocab_size=vocab.size)
    if mb.teacher_logits is not None:
        teacher = vocab.canonical(mb.teacher_logits, group)
        return losses.reverse_kl(student, teacher, kind=loss_cfg.kind, topk=loss_cfg.topk, **kw)
    return losses.reverse_kl_at_ids(student, mb.target_ids, mb.teacher_logprobs, **kw)


@pytest.mark.parametrize("path", ["at_ids", "full", "topk"])
def test_the_old_way_was_over_the_bound(path, tmp_path):
    """Canonical copies cost one more L each and the merge's backward a second gradient; the
    values and gradient were the same (bf16, eager kernels: bit for bit)."""
    peak, logits, value, grad = _loss_path(path, torch.bfloat16, tmp_path, step=_old_prefix_kl)
    assert peak > 2 * logits, (path, peak / logits)
    _, _, new_value, new_grad = _loss_path(path, torch.bfloat16, tmp_path)
    assert torch.equal(new_value, value) and torch.equal(new_grad, grad)
