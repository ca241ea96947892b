"""Speculative TRB (rollout.draft_tokens > 0): exact draws from mu, the records of the
non-speculative policy, invariant to TP, PP and the budget.

Tiny random networks with an 8-token vocabulary (stop ids 1 and 2, merged): the joint
distribution of the first 3 generated tokens of 100k sequences under speculative TRB (g = 4,
TP = 2) and of 50k under non-speculative TRB passes a chi-square test against the product of mu
computed from the two networks at each prefix; the measured acceptance rate is at least
Pinsker's 1 - sqrt(eps / 2); the records of speculative rollouts equal a teacher-forced
recomputation; TP = 2 and PP = 2 equal TP = 1 token for token and budget 2 equals budget 64;
eps = 0 runs no teacher; a huge eps gives beta = 1.

Run: .venv/bin/python -m pytest tests/dist/test_speculative.py
"""

import itertools
import math

import ops_reference as ref
import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig

pytestmark = pytest.mark.dist

STUDENT = ModelSpec(name="s8", num_layers=2, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, num_query_groups=2, vocab_size=8,
                    max_sequence_length=48, qk_layernorm=True, eos_token_id=1)
TEACHER = ModelSpec(name="t8", num_layers=2, hidden_size=48, ffn_hidden_size=96,
                    num_attention_heads=4, vocab_size=8, max_sequence_length=48, eos_token_id=2)
PROMPTS = [[3, 4, 5], [6, 7, 3, 4, 5], [7], [4, 4, 6, 3]]
PROMPT = [3, 4, 5]
EPS, TOPK, DRAFT, MAX_NEW = 0.1, 4, 4, 12
JOINT_ROWS, JOINT_CHUNKS = 25_000, 4


def _models(parallel, pg):
    from trb_nemo.models.networks import build_student, build_teacher

    cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    student, teacher = build_student(cfg, parallel, pg), build_teacher(cfg, parallel, pg)
    with torch.no_grad():  # distributions far from each other and from uniform
        for model, scale in ((student, 30.0), (teacher, 45.0)):
            if model.decoder.final_layernorm is not None:
                model.decoder.final_layernorm.weight.mul_(scale)
    return student, teacher


def _rollout(student, teacher, pg, prompts, *, eps=EPS, draft=DRAFT, seed=0, max_new=MAX_NEW,
             budget=64):
    from trb_nemo.methods.policies import TrustRegionPolicy
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    vocab = SharedVocab.of(ModelConfig(student=STUDENT, teacher=TEACHER))
    return generate(student, teacher, prompts, TrustRegionPolicy("trb", eps),
                    DecodeSettings(max_new_tokens=max_new, topk_k=TOPK, max_in_flight=budget, draft_tokens=draft),
                    vocab=vocab, pg=pg, generator=torch.Generator().manual_seed(seed))


def _plain(r):
    return {"tokens": r.tokens, "lengths": r.response_lengths, "mask": r.loss_mask,
            "records": r.records, "topk_ids": r.topk_ids, "forwards": r.forwards,
            "teacher_topk": None if r.teacher is None else r.teacher.topk_logprobs}


def _full_logits(model, tokens_BS, pg):
    """Teacher-forced logits at every position [B, S, V_pad] (gathered over TP; last stage)."""
    import torch.distributed as dist

    from trb_nemo.rollout.kv_cache import SequenceCache

    b, s = tokens_BS.shape
    cache = SequenceCache(model, b, s, pg)
    with torch.no_grad():
        z = cache.feed(0, tokens_BS, [s] * b, all_positions=True)
    if z is None:
        return None
    parts = [torch.empty_like(z) for _ in range(pg.tp_size)]
    dist.all_gather(parts, z.contiguous(), group=pg.tensor)
    return torch.cat(parts, dim=-1)


def _recompute(student, teacher, r, pg):
    """What the non-speculative policy records at every response prefix of ``r``, from a
    teacher-forced forward of both networks (TP=1, last stage)."""
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.ops.trust_region import solve_beta_and_kl
    from trb_nemo.ops.vocab_parallel import log_softmax, logprobs_at, topk

    vocab = SharedVocab.of(ModelConfig(student=STUDENT, teacher=TEACHER))
    zs = vocab.canonical(_full_logits(student, r.tokens, pg), None)[r.loss_mask]
    zt = vocab.canonical(_full_logits(teacher, r.tokens, pg), None)[r.loss_mask]
    chosen = r.tokens[:, 1:][r.loss_mask[:, :-1]][:, None]
    beta, kl = solve_beta_and_kl(zs, zt, EPS, vocab_size=8, tolerance=1e-6)
    _, top = topk(zs, TOPK, vocab_size=8)
    return {"beta": beta, "kl": kl,
            "student_logprob": log_softmax(zs, vocab_size=8).gather(-1, chosen)[:, 0],
            "teacher_logprob": logprobs_at(zt, chosen, vocab_size=8)[:, 0],
            "topk_ids": top, "teacher_topk": logprobs_at(zt, top, vocab_size=8)}


def _joint_counts(student, teacher, pg, draft, chunks=JOINT_CHUNKS):
    """Counts of the response (up to 3 tokens, shorter when it stops) of ``chunks`` x 25k
    rollouts of one prompt, and the acceptance counts."""
    counts, acc, rej = {}, 0, 0
    for chunk in range(chunks):
        r = _rollout(student, teacher, pg, [PROMPT] * JOINT_ROWS, draft=draft, seed=10 + chunk,
                     max_new=3, budget=JOINT_ROWS)
        for row, n in zip(r.tokens[:, len(PROMPT):].tolist(), r.response_lengths.tolist(),
                          strict=True):
            key = tuple(row[:n])
            counts[key] = counts.get(key, 0) + 1
        acc += r.forwards.get("drafts_accepted", 0)
        rej += r.forwards.get("drafts_rejected", 0)
    return counts, acc, rej


def _joint_reference(student, teacher, pg):
    """P(response) for every response of up to 3 tokens: the product of mu_beta* (EPS) at each
    prefix, mu computed from teacher-forced logits of all 64 two-token continuations."""
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.ops.trust_region import behavior_logprobs, solve_beta

    vocab = SharedVocab.of(ModelConfig(student=STUDENT, teacher=TEACHER))
    pairs = list(itertools.product(range(8), repeat=2))
    toks = torch.tensor([PROMPT + [a, b] for a, b in pairs])
    zs, zt = _full_logits(student, toks, pg), _full_logits(teacher, toks, pg)
    if zs is None:
        return None
    p = len(PROMPT)
    zs = vocab.canonical(zs[:, p - 1:], None).double()  # [64, 3, V]: prefixes P, P x1, P x1 x2
    zt = vocab.canonical(zt[:, p - 1:], None).double()
    beta = solve_beta(zs, zt, EPS, vocab_size=8, tolerance=1e-7)
    mu = behavior_logprobs(zs, zt, beta, vocab_size=8).double().exp()  # [64, 3, V]
    stop = STUDENT.eos_token_id
    probs = {}
    for x1 in range(8):
        p1 = float(mu[0, 0, x1])
        if x1 == stop:
            probs[(x1,)] = p1
            continue
        for x2 in range(8):
            row = pairs.index((x1, x2))
            p2 = p1 * float(mu[row, 1, x2])
            if x2 == stop:
                probs[(x1, x2)] = p2
                continue
            for x3 in range(8):
                probs[(x1, x2, x3)] = p2 * float(mu[row, 2, x3])
    return probs


def run_layout(tp, pp, full_suite):
    from trb_nemo.parallel import groups

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    pg = groups.initialize(parallel, seed=5)
    student, teacher = _models(parallel, pg)
    out = {"spec": _plain(_rollout(student, teacher, pg, PROMPTS)),
           "spec_budget2": _plain(_rollout(student, teacher, pg, PROMPTS, budget=2))}
    if full_suite:
        r = _rollout(student, teacher, pg, PROMPTS)
        out["recomputed"] = _recompute(student, teacher, r, pg)
        out["spec_g2"] = _plain(_rollout(student, teacher, pg, PROMPTS, draft=2))
        out["eps0"] = _plain(_rollout(student, teacher, pg, PROMPTS, eps=0.0))
        out["student"] = _plain(_rollout(student, teacher, pg, PROMPTS, eps=0.0, draft=0))
        out["huge"] = _plain(_rollout(student, teacher, pg, PROMPTS, eps=1e3))
    if tp == 2:
        out["joint_spec"] = _joint_counts(student, teacher, pg, DRAFT)
        out["joint_plain"] = _joint_counts(student, teacher, pg, 0, chunks=2)  # 50k
        out["joint_reference"] = _joint_reference(student, teacher, pg)
    groups.destroy()
    return out


@pytest.fixture(scope="module")
def tp1():
    return spawn_bare(run_layout, 1, 1, 1, True)[0]


@pytest.fixture(scope="module")
def tp2():
    return spawn_bare(run_layout, 2, 2, 1, False, timeout_s=900)


@pytest.fixture(scope="module")
def pp2():
    return spawn_bare(run_layout, 2, 1, 2, False)


def _same(a, b):
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["lengths"], b["lengths"])


def test_layouts_and_budgets_agree_token_for_token(tp1, tp2, pp2):
    for run in (tp2[0]["spec"], tp2[1]["spec"], pp2[0]["spec"], pp2[1]["spec"],
                tp1["spec_budget2"], tp2[0]["spec_budget2"], pp2[0]["spec_budget2"]):
        _same(run, tp1["spec"])
    mask = tp1["spec"]["mask"]
    for run in (tp2[0]["spec"], pp2[1]["spec"], tp1["spec_budget2"]):
        for name in ("beta", "kl", "student_logprob", "teacher_logprob"):
            assert torch.allclose(run["records"][name][mask], tp1["spec"]["records"][name][mask],
                                  atol=1e-5, equal_nan=True), name
        assert torch.equal(run["topk_ids"][mask], tp1["spec"]["topk_ids"][mask])


def test_rounds_verify_several_drafts(tp1):
    f = tp1["spec"]["forwards"]
    generated = int(tp1["spec"]["lengths"].sum())
    assert f["drafts_accepted"] > 0 and f["drafts_rejected"] > 0
    # one teacher forward per round, each round keeps at least one token per sequence
    assert f["teacher"] <= f["rounds"] + 4  # + the prefill sub-batches
    assert f["rounds"] < generated
    assert f["student"] >= DRAFT * f["rounds"]


def test_records_equal_a_teacher_forced_recomputation(tp1):
    spec, want = tp1["spec"], tp1["recomputed"]
    mask = spec["mask"]
    assert mask.sum() >= 15
    for name in ("beta", "kl", "student_logprob", "teacher_logprob"):
        got = spec["records"][name][mask]
        assert (got - want[name]).abs().max() <= 1e-5, name
    assert torch.equal(spec["topk_ids"][mask], want["topk_ids"])
    assert (spec["teacher_topk"][mask] - want["teacher_topk"]).abs().max() <= 1e-5
    assert torch.all(spec["records"]["injected"][mask] == 0)


def test_eps_zero_is_the_student_with_no_teacher(tp1):
    _same(tp1["eps0"], tp1["student"])
    assert tp1["eps0"]["forwards"]["teacher_positions"] == 0
    assert "drafts_accepted" not in tp1["eps0"]["forwards"]


def test_huge_eps_is_the_teacher(tp1):
    huge = tp1["huge"]
    assert torch.all(huge["records"]["beta"][huge["mask"]] == 1)
    assert huge["forwards"]["drafts_rejected"] > 0


def test_other_draft_lengths_run(tp1):
    g2 = tp1["spec_g2"]
    assert torch.all(g2["lengths"] >= 1)
    assert g2["forwards"]["draft_tokens"] == 2


def _chi_square(counts, probs):
    keys = sorted(probs)
    assert set(counts) <= set(keys), set(counts) - set(keys)
    c = torch.tensor([counts.get(k, 0) for k in keys], dtype=torch.long)
    p = torch.tensor([probs[k] for k in keys], dtype=torch.float64)
    assert abs(float(p.sum()) - 1) < 1e-6
    assert torch.all(c[p == 0] == 0)  # the teacher's stop id (merged) is never drawn
    return ref.chi_square_pvalue(c, p)


def test_joint_of_three_tokens_is_the_product_of_mu(tp2):
    probs = tp2[0]["joint_reference"]
    spec_counts, acc, rej = tp2[0]["joint_spec"]
    plain_counts, _, _ = tp2[0]["joint_plain"]
    assert sum(spec_counts.values()) == JOINT_ROWS * JOINT_CHUNKS
    assert _chi_square(spec_counts, probs) > 1e-3
    assert _chi_square(plain_counts, probs) > 1e-3
    # every prefix accepts a draft with probability 1 - TV(mu, pi_S) >= 1 - sqrt(eps / 2)
    rate = acc / (acc + rej)
    assert rej > 1000 and rate >= 1 - math.sqrt(EPS / 2) - 0.01, rate
