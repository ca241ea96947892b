"""pass@1 = mean over a set's problems of c/n, n samples per problem (``eval.num_samples``, or the
set's ``eval.samples_per_set``) at
``eval.temperature``, for each evaluation set (:func:`trb_nemo.data.prompts.build_eval_sets`),
and their unweighted mean over sets (the paper's "Avg").

Every rank of the model-parallel group decodes the same rows; data-parallel ranks split each
set's problems and the per-problem counts of all sets are summed in one all-reduce(SUM) of
[problems of all sets] over DP. The per-problem counts are logged with pass@1, so
``trb-nemo compare`` can pair methods by problem.
"""

from __future__ import annotations

import torch

from trb_nemo import seeds
from trb_nemo.config.schema import TrainConfig
from trb_nemo.data.prompts import EvalSet
from trb_nemo.methods.policies import StudentPolicy
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.parallel import comm, groups
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.engine import generate
from trb_nemo.rollout.types import DecodeSettings, Interrupt, StopRequested


def evaluate(student, sets: list[EvalSet], cfg: TrainConfig, vocab: SharedVocab, step: int,
             pg: ParallelGroups, interrupt: Interrupt | None = None) -> dict:
    """pass@1 of the student on ``sets`` (sampling at eval.temperature, seeded by ``step``):

    * ``eval/pass@1``: the mean over sets of each set's pass@1 (one set: its pass@1);
    * ``eval/<name>/pass@1`` per set, when ``eval.source`` names the sets;
    * ``eval/correct_per_problem``: correct samples of each problem, the sets' problems
      concatenated in order; ``eval/problems_per_set``: how many belong to each set;
      ``eval/samples_per_problem``: n, or with ``eval.samples_per_set`` the n of each problem
      (a list like ``correct_per_problem``); ``eval/samples_per_set``: each set's n.

    Each set is decoded on its own with the same seed (a set's result does not depend on the
    other sets listed; the held-out set of a run without ``eval.source`` is decoded as a set
    holding the same problems would be). Decoding runs the student in eval mode
    (:func:`generate`; its mode is restored afterwards); the teacher is not used. Collective
    over the data-parallel group (one all-reduce) and, inside decoding, the model-parallel
    groups. Data-parallel ranks decode different problems for different lengths: after each set
    every rank waits for the others (:func:`~trb_nemo.parallel.groups.wait_after_uneven_phase`)
    before the next collective. With ``interrupt`` (a stop signal), decoding asks it as it goes
    and the ranks agree after each set (1 all-reduce of [1] over the world): when asked, every
    rank raises :class:`~trb_nemo.rollout.types.StopRequested` within a set's decode."""
    counts = []
    for s in sets:
        try:
            counts.append(_count_correct(student, s, cfg, vocab, step, pg, interrupt))
        except StopRequested:
            pass  # its model-parallel group stopped: the agreement below raises on every rank
        groups.wait_after_uneven_phase()
        if interrupt is not None and interrupt.requested(None):
            raise StopRequested()
    per_problem = comm.all_reduce(torch.cat(counts), group=pg.data)
    sizes = [len(s.prompts) for s in sets]
    samples = [cfg.eval.samples_of(s.name) for s in sets]
    metrics, rates, first = {}, [], 0
    for s, size, n in zip(sets, sizes, samples, strict=True):
        rate = float(per_problem[first:first + size].sum() / max(size * n, 1))
        first += size
        rates.append(rate)
        if cfg.eval.source is not None:
            metrics[f"eval/{s.name}/pass@1"] = rate
    return {"eval/pass@1": sum(rates) / max(len(rates), 1), **metrics,
            "eval/correct_per_problem": [int(c) for c in per_problem.tolist()],
            "eval/problems_per_set": sizes, "eval/samples_per_set": samples,
            "eval/samples_per_problem": (samples[0] if len(set(samples)) == 1 else
                                         [n for n, size in zip(samples, sizes, strict=True) for _ in
                                          range(size)])}


def _count_correct(student, s: EvalSet, cfg: TrainConfig, vocab: SharedVocab, step: int,
                   pg: ParallelGroups, interrupt: Interrupt | None) -> torch.Tensor:
    """[problems] fp64: this DP rank's correct samples of its share of ``s`` (problem j of the
    rank is problem dp_rank + j dp_size of the set), zeros elsewhere."""
    mine = s.prompts[pg.dp_rank::pg.dp_size]
    n = cfg.eval.samples_of(s.name)
    per_problem = torch.zeros(len(s.prompts), dtype=torch.float64)
    if not mine:
        return per_problem
    prompts = [list(p.ids) for p in mine for _ in range(n)]
    seed = seeds.evaluation(cfg.seed, step, pg.dp_rank)
    ro = generate(student, None, prompts, StudentPolicy(cfg.eval.temperature),
                  DecodeSettings(
                      max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                      topk_k=1,
                      max_in_flight=cfg.eval.max_sequences_in_flight
                      or cfg.rollout.max_sequences_in_flight,
                      prefill_tokens=cfg.rollout.prefill_chunk_tokens,
                      cuda_graphs=cfg.rollout.cuda_graphs),
                  vocab=vocab, generator=torch.Generator().manual_seed(seed), pg=pg,
                  interrupt=interrupt)
    for i in range(len(prompts)):
        if s.check(ro.response(i), mine[i // n].answer):
            per_problem[pg.dp_rank + (i // n) * pg.dp_size] += 1
    return per_problem
