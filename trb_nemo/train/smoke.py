"""What `trb-nemo train` runs until the training loop lands: a start-up check of the stack.

On the configured layout it joins the process groups, builds the student and the frozen
teacher, runs the teacher forward-only and one student forward/backward through Megatron's
pipeline schedule (cross-entropy on the teacher's greedy tokens, vocab-parallel), and prints
what it measured. It trains nothing; the TRB training loop replaces it.
"""

from __future__ import annotations

import time

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from trb_nemo.config.schema import TrainConfig
from trb_nemo.logs import quiet_third_party
from trb_nemo.models.networks import build_student, build_teacher
from trb_nemo.parallel import groups


def _run(model, tokens_BS, forward_only, labels_BS=None):
    """One microbatch through the schedule; returns the last stage's output (or loss)."""
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    outputs = {}

    def forward_step(data_iterator, module):
        next(data_iterator)
        out = module(tokens_BS, positions_BS, attention_mask=None)

        def loss_func(logits_BSV):
            outputs["logits"] = logits_BSV.detach()
            if labels_BS is None:
                zero = logits_BSV.sum() * 0.0
                return zero, {}
            loss = vocab_parallel_cross_entropy(logits_BSV.float().clone(), labels_BS).mean()
            outputs["loss"] = loss.detach().clone()
            return loss, {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=tokens_BS.shape[1], micro_batch_size=tokens_BS.shape[0],
        forward_only=forward_only,
    )
    return outputs


def smoke(cfg: TrainConfig) -> dict:
    quiet_third_party()
    t0 = time.perf_counter()
    groups.initialize(cfg.parallel, cfg.seed)
    student = build_student(cfg.model, cfg.parallel)
    teacher = build_teacher(cfg.model, cfg.parallel)
    gen = torch.Generator().manual_seed(cfg.seed)
    seq = min(32, cfg.model.student.max_sequence_length)
    tokens_BS = torch.randint(0, cfg.model.student.vocab_size, (4, seq), generator=gen)
    with torch.no_grad():
        teacher_out = _run(teacher, tokens_BS, forward_only=True)
    labels_BS = None
    if "logits" in teacher_out:  # last stage: the teacher's greedy next tokens (true vocab only)
        from torch import distributed as dist

        logits = teacher_out["logits"].float()  # [b, s, V_pad / TP]
        v0 = groups.tensor_rank() * logits.shape[-1]
        logits[..., max(0, cfg.model.teacher.vocab_size - v0):] = float("-inf")
        local_max, local_arg = logits.max(-1)
        gathered = [torch.empty_like(local_max) for _ in range(dist.get_world_size(groups.tensor_group()))]
        dist.all_gather(gathered, local_max, group=groups.tensor_group())
        best_rank = torch.stack(gathered).argmax(0)
        is_mine = best_rank == groups.tensor_rank()
        labels_BS = torch.where(is_mine, local_arg + v0, torch.zeros_like(local_arg))
        dist.all_reduce(labels_BS, group=groups.tensor_group())
    out = _run(student, tokens_BS, forward_only=False, labels_BS=labels_BS)
    grad_sq = sum(float(p.grad.float().pow(2).sum()) for p in student.parameters() if p.grad is not None)
    result = {
        "student_params_local": sum(p.numel() for p in student.parameters()),
        "teacher_params_local": sum(p.numel() for p in teacher.parameters()),
        "teacher_has_grads": any(p.grad is not None for p in teacher.parameters()),
        "loss": float(out["loss"]) if "loss" in out else None,
        "local_grad_sq": grad_sq,
        "seconds": time.perf_counter() - t0,
    }
    groups.destroy()
    return result
