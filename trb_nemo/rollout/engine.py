"""Continuous-batching student + teacher decoding with per-sequence KV caches under a behavior
policy.

Sequences, not rows: the prompts wait in a queue; at most ``max_in_flight`` sequences decode at
once (``rollout.max_sequences_in_flight``), each network's KV cache holds exactly that many
(:class:`~trb_nemo.rollout.kv_cache.SequenceCache`), and a sequence that ends frees its slot for
a waiting one, so memory is set by the budget and no work is spent on finished sequences. An
admitted group's prompts are prefilled in one forward per sub-batch of similar lengths (at most
``prefill_tokens`` positions each; long prompts in chunks), whatever their lengths, keeping only
each prompt's last logits; then every step feeds one token per live sequence. Both networks'
caches follow the same sequences in lockstep; the teacher's exists only when the policy needs
it.

Exact and invariant: sequence i's tokens and records depend only on the seed, its id
``sequence_ids[i]``, its positions and the weights: its sampling noise is keyed by (seed,
sequence id, position) (:class:`~trb_nemo.ops.sampling.RowNoise`), never by its row in a
batch, so neither the budget, the scheduling order, the other sequences, TP nor PP changes it
(records agree to float rounding: a matmul over more rows may sum in another order).

Output layout (``B`` sequences, ``S`` = longest prompt + ``max_new_tokens``): each row is its
prompt then its response, right-padded with 0. A sequence stops after the canonical stop id
(the student's; the teacher's is merged into it) or ``max_new_tokens``. Per-token records are
indexed by the position ``t`` whose logits drew token ``t + 1`` (the training layout:
``loss_mask[t]`` is true for response prefixes); when the teacher runs they also carry log pi_T
at the student's top-k ids (k = ``loss.topk``), so the loss needs no second teacher pass.

Ranks: every rank of the TP/PP group calls :func:`generate` with the same prompts and generator
state, and makes the same scheduling decisions. The last pipeline stage chooses tokens (all its
TP ranks agree); they are broadcast over the pipeline group every step (1 broadcast of [n]).
Records are broadcast at the end.

Pace (:mod:`trb_nemo.rollout.decoder`, :mod:`trb_nemo.rollout.kv_cache`): one host sync per
decode step (which sequences ended), student-only, TRB lockstep and speculative alike; the
inputs' checks (NaN logits, rows without a finite logit) are read once, at the end of the
call, with the same one-line errors. Each step runs over static buffers, its rows padded up to a
bucket (:func:`~trb_nemo.rollout.kv_cache.row_buckets`), so on CUDA each step shape is captured
once in a CUDA graph and replayed (``settings.cuda_graphs``; :mod:`trb_nemo.rollout.graphs`).
Attention reads each sequence's own keys (:func:`~trb_nemo.models.cached_attention.attend`).
"""

from __future__ import annotations

import contextlib

import torch

from trb_nemo.methods.policies import TrustRegionPolicy
from trb_nemo.models.gpt import uses_transformer_engine
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.parallel.cpu_support import device_mode_suspended
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.decoder import Decoder
from trb_nemo.rollout.speculative import SpeculativeDecoder
from trb_nemo.rollout.types import DecodeSettings, Interrupt, Rollout


@contextlib.contextmanager
def decode_mode(*models):
    """Run ``models`` in eval mode for decoding and restore each one's mode afterwards.

    Eval mode matters beyond dropout: with TE >= 2.2 Megatron keeps the causal mask in a
    one-token decode step of a model in training mode (``transformer/attention.py``). Under FP8
    the TE modules cache their FP8 weight copies after the first microbatch; the cache is
    invalidated here (``set_is_first_microbatch``) so decoding after an optimizer step uses the
    current weights, not the ones cast before the step.
    """
    models = [m for m in models if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
        if getattr(m.config, "fp8", None) is not None and hasattr(m, "set_is_first_microbatch"):
            m.set_is_first_microbatch()
    try:
        yield
    finally:
        for m, mode in zip(models, was_training, strict=True):
            m.train(mode)


def generate(student, teacher, prompts: list[list[int]], policy, settings: DecodeSettings, *,
             vocab: SharedVocab, generator: torch.Generator, pg: ParallelGroups,
             sequence_ids: list[int] | None = None, interrupt: Interrupt | None = None) -> Rollout:
    """Decode ``prompts`` with ``policy`` (see the module docstring) as ``settings`` say, the
    networks in eval mode (:func:`decode_mode`; their modes are restored on return).
    ``sequence_ids`` (default 0..B-1) key each sequence's sampling noise together with one key
    drawn from ``generator``. Every forward feeds a multiple of ``settings.rows_multiple`` rows
    (None: 16 under FP8, whose TE GEMMs need it, else 1); the extra rows feed nothing.
    ``settings.draft_tokens > 0`` with a trust-region policy that runs the teacher decodes
    speculatively (:mod:`trb_nemo.rollout.speculative`: the same distribution, the teacher
    verifying that many student drafts per forward); other policies ignore it. ``interrupt``:
    asked every :attr:`~trb_nemo.rollout.decoder.Decoder.INTERRUPT_EVERY` scheduling steps
    (collective over the model-parallel group); when it says stop, :class:`~trb_nemo.rollout.types.StopRequested` is
    raised on every rank of the group and the caches are released."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = list(range(len(prompts))) if sequence_ids is None else list(sequence_ids)
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} sequence ids for {len(prompts)} prompts")
    used = [student] + ([teacher] if policy.needs_teacher() else [])
    if any(m.config.sequence_parallel for m in used):
        raise ValueError("the rollout engine feeds one token per sequence per step, which "
                         "sequence parallelism cannot split; set parallel.sequence_parallel=false")
    with decode_mode(*used), device_mode_suspended():
        # the outputs are allocated and handed over outside inference mode (training uses them
        # like any tensor); the decoding itself runs in it (no autograd bookkeeping per op, as
        # Megatron's own engines decode) and writes into them in place
        speculative = (settings.draft_tokens > 0 and policy.needs_teacher()
                       and isinstance(policy, TrustRegionPolicy))
        kind = SpeculativeDecoder if speculative else Decoder
        decoder = kind(student, teacher if policy.needs_teacher() else None, prompts, policy,
                       settings, ids=ids, vocab=vocab, generator=generator, pg=pg,
                       interrupt=interrupt)
        # inference mode (no autograd bookkeeping per op, as Megatron's own engines decode),
        # except for Transformer Engine networks: their first forward builds TE's FP8 weight
        # caches and fp8_meta, which a training step must be able to save for backward
        # (inference tensors cannot be); no_grad builds them as ordinary tensors
        te = any(uses_transformer_engine(m) for m in used)
        with torch.no_grad() if te else torch.inference_mode():
            decoder.run()
        return decoder.result()
