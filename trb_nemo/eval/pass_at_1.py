"""pass@1 = mean over held-out problems of c/n, n samples per problem at ``eval.temperature``.

Every rank of the model-parallel group decodes the same rows; data-parallel ranks split the
problems and their per-problem counts are summed (1 all-reduce(SUM) of [problems] over DP).
The per-problem counts are logged with pass@1, so ``trb-nemo compare`` can pair methods by
problem.
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
             pg: ParallelGroups) -> dict:
    """{"eval/pass@1": float, "eval/correct_per_problem": [correct samples of each held-out
    problem], "eval/samples_per_problem": n} of the student (sampling at eval.temperature,
    seeded by ``step``). Decoding runs the networks in eval mode (:func:`generate`); the
    student's mode is restored afterwards."""
    problems = source.eval_prompts(cfg.eval.num_problems)
    mine = problems[pg.dp_rank::pg.dp_size]
    n = cfg.eval.num_samples
    per_problem = torch.zeros(len(problems), dtype=torch.float64)
    if mine:
        prompts = [list(p.ids) for p in mine for _ in range(n)]
        seed = cfg.seed * 1_000_003 + 7 * step + 1_000_000 * pg.dp_rank + 5
        ro = generate(student, teacher, prompts, StudentPolicy(cfg.eval.temperature), vocab=vocab,
                      max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                      topk_k=1, generator=torch.Generator().manual_seed(seed), pg=pg,
                      max_in_flight=cfg.eval.max_sequences_in_flight
                      or cfg.rollout.max_sequences_in_flight,
                      prefill_tokens=cfg.rollout.prefill_chunk_tokens)
        for i in range(len(prompts)):  # problem j of this rank is problems[dp_rank + j dp_size]
            if source.check(ro.response(i), mine[i // n].answer):
                per_problem[pg.dp_rank + (i // n) * pg.dp_size] += 1
    per_problem = comm.all_reduce(per_problem, group=pg.data)
    return {"eval/pass@1": float(per_problem.sum() / max(len(problems) * n, 1)),
            "eval/correct_per_problem": [int(c) for c in per_problem.tolist()],
            "eval/samples_per_problem": n}
