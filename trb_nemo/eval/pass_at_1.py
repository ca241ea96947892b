"""pass@1 = mean over held-out problems of c/n, n samples per problem at ``eval.temperature``.

Every rank of the model-parallel group decodes the same rows; data-parallel ranks split the
problems and their counts are summed (1 all-reduce(SUM) of [2] over DP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trb_nemo.config.schema import TrainConfig
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.parallel import groups
from trb_nemo.rollout.engine import generate
from trb_nemo.rollout.policies import StudentPolicy


def evaluate(student, teacher, source, cfg: TrainConfig, vocab: SharedVocab, step: int) -> float:
    """pass@1 of the student (sampling at eval.temperature, seeded by ``step``)."""
    problems = source.eval_prompts(cfg.eval.num_problems)
    rank, size = groups.data_rank(), groups.data_size()
    mine = problems[rank::size]
    n = cfg.eval.num_samples
    counts = torch.zeros(2, dtype=torch.float64)
    if mine:
        prompts = [list(p.ids) for p in mine for _ in range(n)]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * step + 1_000_000 * rank + 5)
        ro = generate(student, teacher, prompts, StudentPolicy(cfg.eval.temperature), vocab=vocab,
                      max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                      topk_k=1, generator=gen)
        for i in range(len(prompts)):
            counts[0] += float(source.check(ro.response(i), mine[i // n].answer))
        counts[1] = len(prompts)
    if size > 1:
        dist.all_reduce(counts, group=groups.data_group())
    return float(counts[0] / counts[1].clamp_min(1))
