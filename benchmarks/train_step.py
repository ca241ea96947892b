"""A training step with length-grouped, trimmed microbatches vs full-length ones, in one run.

Baseline: the same step with contiguous microbatches that each run the batch's full length
(``optim.pad_to_multiple=0 optim.group_by_length=false``, what every step did before). Measured:
the positions the microbatches run (fed positions), the step's wall time (teacher scoring pass
and the student's forward/backward/update), and the loss (equal up to float summation order).

Workload: B sequences per rank with a long-tail response length distribution like an early OPD
rollout (most responses stop early, a few run to the cap: lengths = cap x u^3, u uniform),
prompts of 32 tokens; a small Qwen3-shaped student and teacher (fp32, CPU or one GPU), top-k
targets recorded as decoding would (random ones: the loss's value means nothing, its equality
between the two runs is the check; the scoring pass runs only with ``--score``).

Run: .venv/bin/python benchmarks/train_step.py [--sequences 32] [--cap 512] [--micro 4]
     [--multiple 64] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig
from trb_nemo.parallel.spawn import run_local_ranks

STUDENT = ModelSpec(name="s", num_layers=4, hidden_size=256, ffn_hidden_size=768,
                    num_attention_heads=8, num_query_groups=4, kv_channels=32, vocab_size=4096,
                    max_sequence_length=4096, qk_layernorm=True, eos_token_id=1)
TEACHER = ModelSpec(name="t", num_layers=4, hidden_size=384, ffn_hidden_size=1024,
                    num_attention_heads=8, num_query_groups=4, kv_channels=48, vocab_size=4096,
                    max_sequence_length=4096, qk_layernorm=True, eos_token_id=2)
PROMPT = 32


def workload(sequences: int, cap: int, topk: int, seed: int = 0) -> dict:
    """tokens, loss_mask [B, S] and recorded top-k targets [B, S, K] of a long-tail batch."""
    g = torch.Generator().manual_seed(seed)
    seq = PROMPT + cap
    lengths = (cap * torch.rand(sequences, generator=g) ** 3).long().clamp_min(1)
    tokens = torch.randint(3, STUDENT.vocab_size, (sequences, seq), generator=g)
    pos = torch.arange(seq)
    end = PROMPT + lengths
    tokens[pos >= end[:, None]] = 0
    mask = (pos >= PROMPT - 1) & (pos < end[:, None] - 1)
    ids = torch.randint(3, STUDENT.vocab_size, (sequences, seq, topk), generator=g)
    lp = torch.log_softmax(torch.randn(sequences, seq, topk, generator=g), -1)
    lp = torch.where(mask[..., None], lp, torch.zeros_like(lp))
    return {"tokens": tokens, "loss_mask": mask, "target_ids": ids, "teacher_logprobs": lp}


def bench(args, device_name: str) -> dict:
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.pipeline import plan_microbatches
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch, score_with_teacher
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(use_distributed_optimizer=False)
    pg = groups.initialize(parallel, seed=1)
    model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    vocab = SharedVocab.of(model_cfg)
    teacher = build_teacher(model_cfg, parallel, pg)
    optim = OptimConfig(lr=1e-4, lr_warmup_steps=0, micro_batch_size=args.micro)
    device = next(teacher.parameters()).device
    batch = {k: v.to(device) for k, v in workload(args.sequences, args.cap, 16).items()}
    loss_cfg = LossConfig(kind="topk", topk=16)
    out = {}
    for name in ("full_length", "grouped_trimmed"):
        training = wrap_student(build_student(model_cfg, parallel, pg), optim, parallel)
        times, losses = [], []
        for r in range(args.repeats + 1):  # the first is a warm-up
            plan = (plan_microbatches(batch["loss_mask"], args.micro, multiple=args.multiple,
                                      group_by_length=True) if name == "grouped_trimmed"
                    else plan_microbatches(batch["loss_mask"], args.micro, multiple=0,
                                           group_by_length=False))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if args.score:
                score_with_teacher(teacher, batch["tokens"], plan, vocab=vocab, pg=pg,
                                   ids=batch["target_ids"])
            m = train_step(training, LossBatch(**batch), 0, loss_cfg, vocab, plan, pg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
                losses.append(m["loss"])
        out[name] = {"seconds": min(times), "loss": losses[0],
                     "fed_positions": plan.fed_positions, "full_positions": plan.full_positions}
    groups.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--cap", type=int, default=512, help="max response tokens")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score", action="store_true", help="include a teacher scoring pass")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    [res] = run_local_ranks(bench, 1, (args, args.device), timeout_s=3600)
    base, new = res["full_length"], res["grouped_trimmed"]
    print(json.dumps(res, indent=1))
    print(f"fed positions: {new['fed_positions']} vs {base['fed_positions']} "
          f"({new['fed_positions'] / base['fed_positions']:.3f}x)")
    print(f"step time: {new['seconds']:.3f} s vs {base['seconds']:.3f} s full-length "
          f"(speed-up {base['seconds'] / new['seconds']:.2f}x)")
    print(f"loss: {new['loss']:.8f} vs {base['loss']:.8f}")


if __name__ == "__main__":
    main()
