"""Rollout cost of TRB during warmup against vanilla OPD (student-only decoding), in one run.

Baseline: ``student`` behavior (the teacher never runs). Measured on the same prompts, models
and layout: generated tokens per second of ``trb`` at eps = eps0 (warmup) and at eps = 0 (after
the warmup: must cost what ``student`` costs), their ratios to ``student``, teacher forward
calls per generated token (one call serves every row; a prefill counts once) and teacher token
positions per generated token (prompt prefill and rows that already stopped included). Models: the toy preset (conf/model/toy.yaml)
or any inline override; TP ranks are started locally (gloo on CPU).

Run: .venv/bin/python benchmarks/rollout.py [--tp 1] [--prompts 16] [--max-new 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics


def _bench(tp: int, prompts: int, max_new: int, repeats: int, eps0: float):
    import torch

    from trb_nemo.config.compose import load_config
    from trb_nemo.config.schema import ParallelConfig
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.policies import StudentPolicy, TrustRegionPolicy

    quiet_third_party()
    torch.set_num_threads(1)
    cfg = load_config(["parallel=cpu_tp1"])
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    pg = groups.initialize(parallel, seed=0)
    student, teacher = build_student(cfg.model, parallel, pg), build_teacher(cfg.model, parallel, pg)
    vocab = SharedVocab.of(cfg.model)
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(3, vocab.size, (int(n),), generator=gen).tolist()
             for n in torch.randint(4, 16, (prompts,), generator=gen)]
    policies = {"student": StudentPolicy(), "trb_warmup": TrustRegionPolicy("trb", eps0),
                "trb_after_warmup": TrustRegionPolicy("trb", 0.0)}
    out = {}
    for name, policy in policies.items():
        rates, per_token, positions = [], [], []
        for r in range(repeats + 1):
            ro = generate(student, teacher, batch, policy, vocab=vocab, max_new_tokens=max_new,
                          topk_k=cfg.loss.topk, generator=torch.Generator().manual_seed(r), pg=pg)
            n = int(ro.loss_mask.sum())
            if r > 0:  # the first run warms up
                rates.append(n / ro.seconds)
                per_token.append(ro.forwards["teacher"] / n)
                positions.append(ro.forwards["teacher_positions"] / n)
        out[name] = tuple(statistics.median(x) for x in (rates, per_token, positions))
    groups.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps0", type=float, default=0.02)
    args = parser.parse_args()
    from trb_nemo.parallel.spawn import run_local_ranks

    res = run_local_ranks(_bench, args.tp, (args.tp, args.prompts, args.max_new, args.repeats,
                                            args.eps0))[0]
    base = res["student"][0]
    print(f"rollout, toy models, TP={args.tp}, {args.prompts} prompts x {args.max_new} new tokens, "
          f"median of {args.repeats}")
    print(f"{'behavior':<18}{'tokens/s':>10}{'ratio to student':>18}{'teacher calls/token':>21}"
          f"{'teacher positions/token':>25}")
    for name, (rate, calls, positions) in res.items():
        print(f"{name:<18}{rate:>10.1f}{rate / base:>18.2f}{calls:>21.3f}{positions:>25.3f}")


if __name__ == "__main__":
    main()
