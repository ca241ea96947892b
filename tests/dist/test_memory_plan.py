"""The memory planner (trb_nemo.plan.memory) against measurement, and `trb-nemo plan`.

For each term the planner counts, its bytes are compared with the bytes of the live tensors of
the same phase on real Megatron-Core models (CPU, gloo): weights (parameter storages), the DDP
gradient buffers, the optimizer's state after a real step (Adam moments; fp32 main weights),
the KV caches the decoder allocates at the budget, the activations a training forward saves
for backward (every tensor autograd packs, by storage, parameters excluded), the logits, the
evaluation's records (what pass@1's decoding of a set returns: tokens, records, top-1 ids, the
loss mask) and the decode path's attention temporaries (the peak of each attention call, by
torch's memory profiler: grouped-query heads folded into the query length, the fused SDPA
kernel with the causal mask, the output's layout): the prefill of the budget's prompts and a decode step
over the longest keys, the larger one).
Within 15% each, and for the training phase's sum of counted terms. Configs: the toy at TP=2
and a Qwen3-0.6B-shaped student (2 layers, the full 151936 vocabulary) at TP=1.

Not measured here, because CPU has none of them: Transformer Engine's FP8 weight caches (TE
needs a GPU), the CUDA context, NCCL's communicators and the allocator's slack (the runtime
reserve); the unit tests check their arithmetic (tests/unit/test_memory_plan_rules.py).

Run: .venv/bin/python -m pytest tests/dist/test_memory_plan.py
"""

import subprocess
import sys

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import (
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)

pytestmark = pytest.mark.dist

TOLERANCE = 0.15

TOY_STUDENT = ModelSpec(name="s", num_layers=2, hidden_size=64, ffn_hidden_size=256,
                        num_attention_heads=4, vocab_size=128, max_sequence_length=128,
                        eos_token_id=1)
TOY_TEACHER = ModelSpec(name="t", num_layers=4, hidden_size=128, ffn_hidden_size=512,
                        num_attention_heads=4, vocab_size=128, max_sequence_length=128,
                        eos_token_id=2)
QWEN_06B_2L = ModelSpec(name="qwen3-0.6b-2l", num_layers=2, hidden_size=1024,
                        ffn_hidden_size=3072, num_attention_heads=16, num_query_groups=8,
                        kv_channels=128, vocab_size=151936, max_sequence_length=256,
                        qk_layernorm=True, tie_embeddings=True, eos_token_id=151643)
QWEN_TEACHER = ModelSpec(name="teacher-2l", num_layers=2, hidden_size=512, ffn_hidden_size=1024,
                         num_attention_heads=8, num_query_groups=4, kv_channels=64,
                         vocab_size=151936, max_sequence_length=256, qk_layernorm=True,
                         eos_token_id=151645)


def config(student, teacher, tp: int, seq: int, micro: int, prompts: int) -> TrainConfig:
    prompt = 16
    return TrainConfig(
        model=ModelConfig(student=student, teacher=teacher, precision="fp32"),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, backend="gloo",
                                use_distributed_optimizer=False),
        optim=OptimConfig(micro_batch_size=micro, prompts_per_step=prompts, lr_warmup_steps=0),
        rollout=RolloutConfig(max_new_tokens=seq - prompt, num_rollouts_per_prompt=1,
                              max_sequences_in_flight=prompts),
        data=DataConfig(max_prompt_length=prompt),
        loss=LossConfig(topk=4),
        eval=EvalConfig(num_problems=2, num_samples=3),
    )


def _storage_bytes(tensors, exclude=frozenset()) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _peak_bytes(prof) -> int:
    """The most bytes allocated at once during a profiled block (its allocations only)."""
    from torch.profiler._memory_profiler import Action

    now = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type == "cpu" and action in (Action.CREATE, Action.DESTROY):
            now += size if action == Action.CREATE else -size
            peak = max(peak, now)
    return peak


class AttentionPeaks:
    """Within the block, each attention call of the decode path
    (``trb_nemo.models.cached_attention.attend``: the folding of the query heads, the mask, the
    kernel, the output's layout) runs under torch's memory profiler; ``peaks`` the peak bytes of
    each call made while ``on``."""

    def __init__(self):
        self.peaks, self.on = [], False

    def __enter__(self):
        import trb_nemo.models.cached_attention as cached

        real = cached.attend

        def measured(*args, **kwargs):
            if not self.on:
                return real(*args, **kwargs)
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, profile_memory=True,
                                        record_shapes=True, with_stack=True) as prof:
                result = real(*args, **kwargs)
            self.peaks.append(_peak_bytes(prof))
            return result

        self.module, self.original = cached, real
        cached.attend = measured
        return self

    def __exit__(self, *exc):
        self.module.attend = self.original


def measure(cfg: TrainConfig) -> dict:
    """Bytes of the live tensors of each counted term on this rank."""
    import torch.distributed as dist

    from trb_nemo.methods.policies import StudentPolicy
    from trb_nemo.methods.table import policy_for
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.kv_cache import SequenceCache
    from trb_nemo.rollout.types import DecodeSettings
    from trb_nemo.train.optimizer import wrap_student

    pg = groups.initialize(cfg.parallel, seed=3)
    student = build_student(cfg.model, cfg.parallel, pg)
    teacher = build_teacher(cfg.model, cfg.parallel, pg)
    training = wrap_student(student, cfg.optim, cfg.parallel)
    out = {"student weights": _storage_bytes(student.parameters()),
           "teacher weights": _storage_bytes(teacher.parameters()),
           "student grads (fp32)": sum(b.grad_data.numel() * b.grad_data.element_size()
                                       for b in training.model.buffers)}
    weights = {p.untyped_storage().data_ptr() for p in student.parameters()}

    # KV caches at the budget: one per network, (prompt + new tokens) positions each
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    sequences = cfg.optim.prompts_per_step * cfg.rollout.num_rollouts_per_prompt // pg.dp_size
    slots = min(cfg.rollout.max_sequences_in_flight, sequences)
    student.eval()
    caches = [SequenceCache(m, slots, seq, pg) for m in (student, teacher)]
    out["KV caches"] = sum(c.bytes() for c in caches)
    for c in caches:
        c.release()

    # attention temporaries: each network the rollout runs at step 0, its cache at the budget:
    # the prefill of one prompt per slot, then (teacher-forced, not measured) up to the last
    # position, and one decode step over all seq keys
    prompt = cfg.data.max_prompt_length
    lockstep = policy_for(0, cfg.rollout, cfg.trb).needs_teacher()
    gen = torch.Generator().manual_seed(0)
    vocab_size = cfg.model.student.vocab_size
    with torch.no_grad(), AttentionPeaks() as sdpa:
        for m in [student, teacher] if lockstep else [student]:
            m.eval()
            cache = SequenceCache(m, slots, seq, pg)
            tokens = torch.randint(3, vocab_size, (slots, seq), generator=gen)
            for s in range(slots):
                cache.start(s)
            sdpa.on = True
            cache.feed(0, tokens[:, :prompt], [prompt] * slots)
            sdpa.on = False
            cache.feed(0, tokens[:, prompt:seq - 1], [seq - 1 - prompt] * slots)
            sdpa.on = True
            cache.feed(0, tokens[:, seq - 1:], [1] * slots)
            sdpa.on = False
            cache.release()
    out["attention temporaries"] = max(sdpa.peaks)

    # evaluation: the outputs of pass@1's decoding of a set (its settings), this rank's share
    ev = cfg.eval
    n = -(-ev.num_problems // pg.dp_size) * ev.num_samples
    prompts = [torch.randint(3, vocab_size, (prompt,), generator=gen).tolist() for _ in range(n)]
    ro = generate(student, None, prompts, StudentPolicy(ev.temperature), DecodeSettings(
        max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens, topk_k=1,
        max_in_flight=ev.max_sequences_in_flight or cfg.rollout.max_sequences_in_flight,
        prefill_tokens=cfg.rollout.prefill_chunk_tokens),
        vocab=SharedVocab.of(cfg.model), generator=torch.Generator().manual_seed(1), pg=pg)
    out["evaluation records"] = _storage_bytes([ro.tokens, *ro.records.values(), ro.topk_ids,
                                                ro.loss_mask])
    student.train()

    # training: one microbatch at the full length; what autograd saves, and the logits
    b = cfg.optim.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.model.student.vocab_size, (b, seq), generator=gen)
    positions = torch.arange(seq).expand(b, seq)
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = training.model(tokens, positions, attention_mask=None)
    out["activations"] = sum(saved.values())
    out["logits"] = logits.numel() * logits.element_size()
    logits.float().square().mean().backward()  # a real step: the optimizer allocates its state
    training.optimizer.step()
    state = []
    for inner in getattr(training.optimizer, "chained_optimizers", [training.optimizer]):
        for s in inner.optimizer.state.values():
            state.extend(v for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        for group in inner.optimizer.param_groups:
            state.extend(group["params"])  # fp32 main weights (the weights themselves in fp32)
    out["optimizer (main weights, Adam)"] = _storage_bytes(state, exclude=weights)
    dist.barrier()
    groups.destroy()
    return out


def planned(cfg: TrainConfig, world: int) -> dict:
    """The planner's bytes of the same terms (a microbatch at the full length)."""
    from trb_nemo.plan.memory import plan_memory

    phases = {p.name: p for p in plan_memory(cfg, world)}
    out = {name: phases["training"].term(name) for name in
           ("student weights", "teacher weights", "student grads (fp32)",
            "optimizer (main weights, Adam)", "activations")}
    out["KV caches"] = phases["rollout"].term("KV caches")
    out["attention temporaries"] = phases["rollout"].term("attention temporaries")
    out["evaluation records"] = phases["evaluation"].term("evaluation records")
    out["logits"] = phases["training"].term("logits, their gradient and the loss buffer") // 3
    return out


CASES = {
    "toy-tp2": (config(TOY_STUDENT, TOY_TEACHER, tp=2, seq=64, micro=4, prompts=8), 2),
    "qwen3-0.6b-shaped-tp1": (config(QWEN_06B_2L, QWEN_TEACHER, tp=1, seq=128, micro=2,
                                     prompts=4), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planner_matches_measured_bytes(case):
    cfg, world = CASES[case]
    results = spawn_bare(measure, world, cfg, timeout_s=400)
    plan = planned(cfg, world)
    for measured in results:  # every rank holds the same shares
        assert measured.keys() == plan.keys()
        for name, got in measured.items():
            assert got > 0, name
            assert abs(plan[name] - got) <= TOLERANCE * got, (
                f"{case} {name}: planned {plan[name]} vs measured {got} bytes "
                f"({plan[name] / got:.3f}x)")
        decoding = ("KV caches", "attention temporaries", "evaluation records")
        training = [n for n in plan if n not in decoding]
        total_plan = sum(plan[n] for n in training)
        total_measured = sum(measured[n] for n in training)
        assert abs(total_plan - total_measured) <= TOLERANCE * total_measured


def test_plan_cli_recipes_fit_and_a_huge_microbatch_is_refused_naming_training():
    def plan(*overrides):
        return subprocess.run([sys.executable, "-m", "trb_nemo.cli", "plan", *overrides],
                              capture_output=True, text=True, timeout=120)

    for recipe in ("paper_qwen3_1.7b", "paper_qwen3_0.6b"):
        ok = plan(f"recipe={recipe}")
        assert ok.returncode == 0, ok.stderr
        lines = ok.stdout.splitlines()
        assert lines[0].startswith("per-GPU memory plan: TP=2 PP=1 DP=4, bf16")
        phases = [line for line in lines if not line.startswith(" ")][1:]
        assert [p.split()[0] for p in phases] == ["rollout", "scoring", "training", "evaluation"]
        for p in phases:
            assert float(p.split()[1]) < 80 and " ok " in p, p
    over = plan("recipe=paper_qwen3_1.7b", "optim.micro_batch_size=64")
    assert over.returncode == 2
    err = over.stderr.strip().splitlines()
    assert len(err) == 1 and "parallel.gpu_memory_gb: the training phase needs" in err[0], err


def test_launch_dry_run_of_the_recipe_renders_and_refuses_what_does_not_fit(tmp_path):
    def launch(*overrides):
        return subprocess.run([sys.executable, "-m", "trb_nemo.cli", "launch", "slurm",
                               "recipe=paper_qwen3_1.7b", *overrides, "--dry-run"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    ok = launch()
    assert ok.returncode == 0, ok.stderr
    script = (tmp_path / "outputs/paper-qwen3-1.7b/slurm/run.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=8" in script
    assert "recipe=paper_qwen3_1.7b" in script  # the trainer composes the same recipe
    over = launch("optim.micro_batch_size=64")
    assert over.returncode == 2
    assert "the training phase needs" in over.stderr and len(over.stderr.strip().splitlines()) == 1
