"""pass@1 = mean over held-out problems of c/n, n samples per problem at ``eval.temperature``.

Every rank of the model-parallel group decodes the same rows; data-parallel ranks split the
problems and their counts are summed (1 all-reduce(SUM) of [2] over DP).
"""

from __future__ import annotations

import torch

from trb_nemo.config.schema import TrainConfig
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.engine import generate
from trb_nemo.rollout.policies import StudentPolicy


def evaluate(student, teacher, source, cfg: TrainConfig, vocab: SharedVocab, step: int,
             pg: ParallelGroups) -> float:
    """pass@1 of the student (sampling at eval.temperature, seeded by ``step``). Decoding runs
    the networks in eval mode (:func:`generate`); the student's mode is restored afterwards."""
    problems = source.eval_prompts(cfg.eval.num_problems)
    mine = problems[pg.dp_rank::pg.dp_size]
    n = cfg.eval.num_samples
    correct, total = 0, 0
    if mine:
        prompts = [list(p.ids) for p in mine for _ in range(n)]
        seed = cfg.seed * 1_000_003 + 7 * step + 1_000_000 * pg.dp_rank + 5
        ro = generate(student, teacher, prompts, StudentPolicy(cfg.eval.temperature), vocab=vocab,
                      max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                      topk_k=1, generator=torch.Generator().manual_seed(seed), pg=pg,
                      max_in_flight=cfg.eval.max_sequences_in_flight
                      or cfg.rollout.max_sequences_in_flight,
                      prefill_tokens=cfg.rollout.prefill_chunk_tokens)
        correct = sum(bool(source.check(ro.response(i), mine[i // n].answer))
                      for i in range(len(prompts)))
        total = len(prompts)
    counts = comm.all_reduce(torch.tensor([correct, total], dtype=torch.float64), group=pg.data)
    return float(counts[0] / counts[1].clamp_min(1))
