"""Rollout engine: continuous batching with per-sequence KV caches under the behavior policies.

TP=2 and PP=2 rollouts equal TP=1 token for token and reruns are identical; a budget of 2
sequences in flight gives the same sequences as 64; cached decode logits (prompts of different
lengths prefilled together, then one token per step, a sequence moved to another slot) equal a
full recompute; trb with eps = 0 is the student rollout with zero teacher
forwards; a huge eps samples the teacher (beta = 1); 100k first tokens from trb pass a
chi-square test against mu_beta; skd and temperature reduce to the student where they should.

Run: .venv/bin/python -m pytest tests/dist/test_rollout.py
"""

import ops_reference as ref
import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig

pytestmark = pytest.mark.dist

# vocab 100 pads to 128 / 256; stop ids 1 (student) and 70 (teacher) on different TP=2 shards
STUDENT = ModelSpec(name="s", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=100,
                    max_sequence_length=64, qk_layernorm=True, eos_token_id=1)
TEACHER = ModelSpec(name="t", num_layers=2, hidden_size=96, ffn_hidden_size=192,
                    num_attention_heads=4, vocab_size=100, max_sequence_length=64, eos_token_id=70)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
MAX_NEW, TOPK, EPS = 12, 4, 0.05
CHI_ROWS, CHI_CHUNKS = 25_000, 4


class TeacherSampler:
    """Test-only policy: draw from pi_T with the same noise as the library's policies."""

    name = "teacher"

    def needs_teacher(self):
        return True

    def choose(self, zs, zt, noise, group, vocab_size):
        from trb_nemo.methods.policies import _student_only
        from trb_nemo.ops.sampling import sample

        return _student_only(sample(zt, noise=noise, vocab_group=group, vocab_size=vocab_size))


class ForcedStop:
    """Test-only policy: the student's draw, except sequences 0 and 2 emit the stop id at call 4."""

    name = "forced-stop"

    def __init__(self):
        from trb_nemo.methods.policies import StudentPolicy

        self.inner, self.calls = StudentPolicy(), 0

    def needs_teacher(self):
        return False

    def choose(self, zs, zt, noise, group, vocab_size):
        choice = self.inner.choose(zs, zt, noise, group, vocab_size)
        self.calls += 1
        if self.calls == 4:  # by sequence (noise.ids_R), wherever the batch put it
            choice.ids = choice.ids.clone()
            choice.ids[(noise.ids_R == 0) | (noise.ids_R == 2)] = STUDENT.eos_token_id
        return choice


def _models(parallel, pg):
    from trb_nemo.models.networks import build_student, build_teacher

    cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    student, teacher = build_student(cfg, parallel, pg), build_teacher(cfg, parallel, pg)
    with torch.no_grad():  # sharper distributions than the N(0, 0.02) init gives
        for model, scale in ((student, 40.0), (teacher, 60.0)):
            if model.decoder.final_layernorm is not None:  # last pipeline stage
                model.decoder.final_layernorm.weight.mul_(scale)
    return cfg, student, teacher


def _rollout(student, teacher, policy, pg, prompts=PROMPTS, seed=0, max_new=MAX_NEW, budget=64):
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    cfg = ModelConfig(student=STUDENT, teacher=TEACHER)
    return generate(student, teacher, prompts, policy,
                    DecodeSettings(max_new_tokens=max_new, topk_k=TOPK, max_in_flight=budget),
                    vocab=SharedVocab.of(cfg),
                    generator=torch.Generator().manual_seed(seed), pg=pg)


def _kv_vs_recompute(student, pg):
    """max |cached logits - full forward logits| (last stage; None elsewhere): prompts of 5, 9
    and 3 tokens prefilled in one forward, 8 one-token steps (4 fed as a prefill feeds, 4 as
    the engine's decode steps: static buffers, rows padded to a bucket, device positions),
    then the third sequence moved from slot 2 to slot 3 and decoded alone for 2 more steps."""
    from trb_nemo.models.pipeline import run_schedule
    from trb_nemo.rollout.kv_cache import SequenceCache

    toks = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = run_schedule(student, [{"tokens": toks}], lambda i, mb, z: z.detach(), pg,
                            forward_only=True)
    cache = SequenceCache(student, 4, 24, pg)
    lens = [5, 9, 3]
    prompts = torch.stack([torch.nn.functional.pad(toks[b, :n], (0, 9 - n))
                           for b, n in enumerate(lens)])
    pairs = [(cache.feed(0, prompts, lens), [(b, n - 1) for b, n in enumerate(lens)])]
    for t in range(8):  # decode steps: 4 as the prefill feeds, 4 as the engine steps
        fed = torch.stack([toks[b, n:n + 1] for b, n in enumerate(lens)])
        out = cache.feed(0, fed, [1, 1, 1]) if t < 4 else cache.step(3, fed)
        pairs.append((None if out is None else out.clone(),  # a step's output buffer is reused
                      [(b, n) for b, n in enumerate(lens)]))
        lens = [n + 1 for n in lens]
    cache.move(2, 3)
    for _ in range(2):
        pairs.append((cache.feed(3, toks[2:3, lens[2]:lens[2] + 1], [1]), [(2, lens[2])]))
        lens[2] += 1
    if not full:
        return None
    return max((out[r] - full[0][b, t]).abs().max().item()
               for out, where in pairs for r, (b, t) in enumerate(where))


def _plain(r):
    return {"tokens": r.tokens, "records": r.records, "topk_ids": r.topk_ids,
            "teacher_topk": r.teacher and r.teacher.topk_logprobs, "lengths": r.response_lengths,
            "forwards": r.forwards, "mask": r.loss_mask, "stopped": r.stopped}


def run_layout(tp, pp, full_suite):
    from trb_nemo.methods.policies import InjectionPolicy, StudentPolicy, TrustRegionPolicy
    from trb_nemo.parallel import groups

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    pg = groups.initialize(parallel, seed=3)
    _, student, teacher = _models(parallel, pg)
    student.eval()
    out = {"kv_diff": _kv_vs_recompute(student, pg),
           "trb": _plain(_rollout(student, teacher, TrustRegionPolicy("trb", EPS), pg)),
           "trb_budget2": _plain(_rollout(student, teacher, TrustRegionPolicy("trb", EPS), pg,
                                          budget=2))}
    if full_suite:
        out["trb_again"] = _plain(_rollout(student, teacher, TrustRegionPolicy("trb", EPS), pg))
        out["student"] = _plain(_rollout(student, teacher, StudentPolicy(), pg))
        out["trb_eps0"] = _plain(_rollout(student, teacher, TrustRegionPolicy("trb", 0.0), pg))
        out["trb_huge"] = _plain(_rollout(student, teacher, TrustRegionPolicy("trb", 1e3), pg))
        out["teacher"] = _plain(_rollout(student, teacher, TeacherSampler(), pg))
        out["skd_all"] = _plain(_rollout(student, teacher, InjectionPolicy(100, 0.5), pg))
        out["skd_one"] = _plain(_rollout(student, teacher, InjectionPolicy(1, 0.5), pg))
        out["temperature_1"] = _plain(_rollout(student, teacher, StudentPolicy(1.0), pg))
        out["temperature_low"] = _plain(_rollout(student, teacher, StudentPolicy(0.3), pg))
        out["forced_stop"] = _plain(_rollout(student, teacher, ForcedStop(), pg))
    if tp == 2:
        out["chi"] = _chi_square_counts(student, teacher, pg)
    groups.destroy()
    return out


def _chi_square_counts(student, teacher, pg):
    """First-token counts of 100k trb rollouts of one prompt, and mu_beta at that prefix."""
    import torch.distributed as dist

    from trb_nemo.methods.policies import TrustRegionPolicy
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.ops.trust_region import behavior_logprobs, solve_beta
    from trb_nemo.rollout.kv_cache import SequenceCache

    prompt = [21, 22, 23]
    counts = torch.zeros(256, dtype=torch.long)  # the padded vocabulary at TP=2
    for chunk in range(CHI_CHUNKS):
        r = _rollout(student, teacher, TrustRegionPolicy("trb", EPS), pg, [prompt] * CHI_ROWS,
                     seed=100 + chunk, max_new=1, budget=CHI_ROWS)
        counts += torch.bincount(r.tokens[:, len(prompt)], minlength=256)
    vocab = SharedVocab.of(ModelConfig(student=STUDENT, teacher=TEACHER))
    grp = pg.tensor
    zs = vocab.canonical(SequenceCache(student, 1, 8, pg).feed(0, torch.tensor([prompt]), [3]), grp)
    zt = vocab.canonical(SequenceCache(teacher, 1, 8, pg).feed(0, torch.tensor([prompt]), [3]), grp)
    beta = solve_beta(zs, zt, EPS, vocab_group=grp, vocab_size=100)
    log_mu = behavior_logprobs(zs, zt, beta, vocab_group=grp, vocab_size=100)
    parts = [torch.empty_like(log_mu) for _ in range(dist.get_world_size(grp))]
    dist.all_gather(parts, log_mu.contiguous(), group=grp)
    return counts, torch.cat(parts, -1)[0].exp().double(), float(beta[0])


@pytest.fixture(scope="module")
def tp1():
    return spawn_bare(run_layout, 1, 1, 1, True)[0]


@pytest.fixture(scope="module")
def tp2():
    return spawn_bare(run_layout, 2, 2, 1, False, timeout_s=400)


@pytest.fixture(scope="module")
def pp2():
    return spawn_bare(run_layout, 2, 1, 2, False)


def _same_tokens(a, b):
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["lengths"], b["lengths"])


def test_kv_cache_equals_recompute(tp1, tp2, pp2):
    diffs = [tp1["kv_diff"], tp2[0]["kv_diff"], tp2[1]["kv_diff"], pp2[1]["kv_diff"]]
    assert pp2[0]["kv_diff"] is None  # first stage: no logits
    assert max(diffs) <= 1e-5, diffs


def test_layouts_budgets_and_reruns_agree(tp1, tp2, pp2):
    base = tp1["trb"]
    _same_tokens(base, tp1["trb_again"])
    mask = base["mask"]
    for rank in tp2 + pp2 + [tp1]:
        for run in (rank["trb"], rank["trb_budget2"]):
            _same_tokens(base, run)
            assert torch.equal(run["mask"], mask)
            for name in ("beta", "kl", "student_logprob", "teacher_logprob"):
                assert torch.allclose(run["records"][name][mask], base["records"][name][mask],
                                      atol=1e-5), name
            assert torch.equal(run["topk_ids"][mask], base["topk_ids"][mask])
            assert torch.allclose(run["teacher_topk"][mask], base["teacher_topk"][mask], atol=1e-5)
    # budget 2 holds 2 sequences per network, budget 64 all 4 prompts
    assert tp1["trb_budget2"]["forwards"]["kv_cache_bytes"] * 2 == base["forwards"]["kv_cache_bytes"]
    # the trust region was active: 0 < beta < 1 somewhere, and KL <= eps everywhere
    beta, kl = base["records"]["beta"][base["mask"]], base["records"]["kl"][base["mask"]]
    assert ((beta > 0) & (beta < 1)).any() and (beta > 0).all()
    assert torch.all(kl <= EPS * (1 + 1e-6))
    assert torch.isfinite(base["teacher_topk"][base["mask"]]).all()
    assert base["forwards"]["teacher"] == base["forwards"]["student"] > 1


def test_responses_end_at_the_canonical_stop(tp1):
    for name in ("trb", "student", "teacher", "forced_stop"):
        r = tp1[name]
        for i, p in enumerate(PROMPTS):
            resp = r["tokens"][i, len(p): len(p) + int(r["lengths"][i])]
            assert 70 not in resp.tolist()  # the teacher's stop id is merged into 1
            if r["stopped"][i]:
                assert resp[-1] == 1 and 1 not in resp[:-1].tolist()
            else:
                assert len(resp) == MAX_NEW
            assert r["mask"][i].sum() == len(resp)
    forced = tp1["forced_stop"]  # call 4 draws every sequence's 4th token
    assert forced["stopped"].tolist()[0] and forced["stopped"].tolist()[2]
    assert forced["lengths"][[0, 2]].tolist() == [4, 4]


def test_eps_zero_is_the_student_and_never_runs_the_teacher(tp1):
    _same_tokens(tp1["trb_eps0"], tp1["student"])
    assert tp1["trb_eps0"]["forwards"]["teacher"] == 0 == tp1["student"]["forwards"]["teacher"]
    assert tp1["trb_eps0"]["teacher_topk"] is None
    mask = tp1["trb_eps0"]["mask"]
    assert torch.all(tp1["trb_eps0"]["records"]["beta"][mask] == 0)


def test_huge_eps_samples_the_teacher(tp1):
    huge = tp1["trb_huge"]
    assert torch.all(huge["records"]["beta"][huge["mask"]] == 1)
    _same_tokens(huge, tp1["teacher"])
    assert not torch.equal(huge["tokens"], tp1["student"]["tokens"])


def test_chi_square_of_trb_first_tokens(tp2):
    counts, mu, beta = tp2[0]["chi"]
    assert 0 < beta < 1
    assert counts.sum() == CHI_ROWS * CHI_CHUNKS
    assert torch.all(counts[mu == 0] == 0)
    assert ref.chi_square_pvalue(counts[:100], mu[:100]) > 1e-3
    assert torch.equal(counts, tp2[1]["chi"][0])


def test_skd_and_temperature_reduce_to_the_student(tp1):
    _same_tokens(tp1["skd_all"], tp1["student"])  # every token is in the teacher's top-100
    assert tp1["skd_all"]["records"]["injected"][tp1["skd_all"]["mask"]].sum() == 0
    one = tp1["skd_one"]
    injected = one["records"]["injected"][one["mask"]]
    assert 0 < injected.mean() <= 1
    _same_tokens(tp1["temperature_1"], tp1["student"])
    assert not torch.equal(tp1["temperature_low"]["tokens"], tp1["student"]["tokens"])
