"""Make the toy teacher and student of the embedded default run (``trb-nemo train``).

Both are the Megatron-Core networks of ``conf/model/toy.yaml``, trained here by supervised
fine-tuning on step-by-step solutions of the toy task (``trb_nemo/data/toy_math.py``):
* the teacher (4 layers, hidden 128) until pass@1 at temperature 1.0 is >= 0.9 on held-out
  problems, ending responses with ``<|im_end|>`` (an Instruct model);
* the student (2 layers, hidden 64) for only a few steps, so it knows the format but is
  weak (pass@1 <= 0.3), ending responses with ``<|endoftext|>`` (a Base model).
They are saved as Megatron checkpoint folders under ``examples/toy_math/checkpoints/`` (loadable
at any TP/PP layout), which the repository ships. Re-make them with:

    .venv/bin/python examples/toy_math/make_models.py   # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "checkpoints"


def sft_batch(seed: int, start: int, size: int, stop_id: int):
    """Padded tokens [B, S] and the loss mask of the response tokens (targets) [B, S]."""
    from trb_nemo.data.toy_math import CharTokenizer, problem

    tok = CharTokenizer()
    seqs, starts = [], []
    for i in range(start, start + size):
        p = problem(seed, i)
        prompt = tok.encode(p.prompt)
        seqs.append(prompt + tok.encode(p.solution) + [stop_id])
        starts.append(len(prompt))
    length = max(map(len, seqs))
    tokens = torch.zeros(size, length + 1, dtype=torch.long)
    mask = torch.zeros(size, length + 1, dtype=torch.bool)
    for r, (s, p0) in enumerate(zip(seqs, starts, strict=True)):
        tokens[r, : len(s)] = torch.tensor(s)
        mask[r, p0 - 1: len(s) - 1] = True  # position t predicts token t + 1
    return tokens, mask


def pass_at_1(model, stop_id: int, cfg, seed: int, pg) -> float:
    """pass@1 at temperature 1.0 on 64 held-out problems x 4 samples (trb_nemo.eval)."""
    from trb_nemo.config.schema import EvalConfig
    from trb_nemo.data.prompts import EvalSet, ToyMathSource
    from trb_nemo.eval.pass_at_1 import evaluate
    from trb_nemo.models.vocab import SharedVocab

    cfg = dataclasses.replace(cfg, seed=seed,
                              eval=EvalConfig(num_problems=64, num_samples=4, max_new_tokens=40))
    source = ToyMathSource(seed, cfg.data.max_prompt_length)
    held_out = EvalSet("toy_math", "toy_math", source.eval_prompts(64), source.check)
    return evaluate(model, [held_out], cfg, SharedVocab(128, stop_id, stop_id), step=0,
                    pg=pg)["eval/pass@1"]


def train(model, stop_id: int, steps: int, lr: float, seed: int, target: float | None, log,
          cfg, pg) -> float:
    """SFT with AdamW; every 100 steps measure pass@1 and stop early once it reaches target."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    score = 0.0
    for step in range(steps):
        tokens, mask = sft_batch(seed, step * 64, 64, stop_id)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        model.train()
        loss_bs = model(inputs, positions, attention_mask=None, labels=labels)  # [b, s] CE
        loss = (loss_bs * mask[:, :-1]).sum() / mask[:, :-1].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            score = pass_at_1(model, stop_id, cfg, seed, pg)
            log(f"step {step + 1}: loss {loss.item():.4f} pass@1 {score:.3f}")
            if target is not None and score >= target:
                break
    return score


def make(student_steps: int, teacher_max_steps: int, roles: tuple[str, ...]) -> dict:
    from trb_nemo.config.compose import load_config
    from trb_nemo.data.toy_math import STUDENT_STOP, TEACHER_STOP
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.megatron_io import save_model
    from trb_nemo.models.networks import build_network
    from trb_nemo.parallel import groups

    quiet_third_party()
    torch.set_num_threads(2)
    cfg = load_config(["parallel=cpu_tp1", "model.student.checkpoint=null",
                       "model.teacher.checkpoint=null"])
    pg = groups.initialize(cfg.parallel, seed=cfg.seed)
    results = {}
    for role, stop, steps, lr, target in (("teacher", TEACHER_STOP, teacher_max_steps, 2e-3, 0.95),
                                          ("student", STUDENT_STOP, student_steps, 2e-3, None)):
        if role not in roles:
            continue
        spec = getattr(cfg.model, role)
        model = build_network(spec, cfg.model, cfg.parallel, pg, cfg.model.init_seed + len(role))
        print(f"{role}: SFT")
        score = train(model, stop, steps, lr, seed=11 if role == "teacher" else 13, target=target,
                      log=lambda m, r=role: print(f"  {r} {m}", flush=True), cfg=cfg, pg=pg)
        save_model(OUT / role, model, dataclasses.replace(spec, checkpoint=None))
        results[role] = score
    groups.destroy()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Make the toy teacher and student.")
    parser.add_argument("--student-steps", type=int, default=100)
    parser.add_argument("--teacher-max-steps", type=int, default=3000)
    parser.add_argument("--roles", nargs="+", default=["teacher", "student"],
                        choices=["teacher", "student"], help="which models to (re)make")
    args = parser.parse_args()
    from trb_nemo.parallel.spawn import run_local_ranks

    res = run_local_ranks(make, 1, (args.student_steps, args.teacher_max_steps,
                                    tuple(args.roles)), timeout_s=3600)[0]
    print("pass@1 at temperature 1.0 on 64 held-out problems x 4 samples: "
          + ", ".join(f"{role} {score:.3f}" for role, score in res.items())
          + f"; saved under {OUT.name}/")


if __name__ == "__main__":
    main()
