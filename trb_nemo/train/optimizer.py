"""The student's DDP wrapper, Megatron optimizer and learning-rate schedule.

DDP: Megatron's DistributedDataParallel with fp32 gradient buffers; with
``parallel.use_distributed_optimizer`` the Adam state and fp32 main weights are sharded over the
data-parallel ranks (Megatron DistributedOptimizer). Gradients are summed over DP and divided
by the global response-token count in ``finalize_model_grads`` (``calculate_per_token_loss``):
the update is the gradient of the token mean over the whole global batch, on every layout.
Adam is torch AdamW on CPU (no TE/Apex) and fused Adam on GPU; biases and norms have no weight
decay (Megatron's default rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from trb_nemo.config.schema import OptimConfig, ParallelConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to ``optim.lr`` over
    ``lr_warmup_steps`` steps (first step lr / warmup, never 0), then constant (paper Table 2)."""
    if optim.lr_warmup_steps > 0 and step < optim.lr_warmup_steps:
        return max(optim.min_lr, optim.lr * (step + 1) / optim.lr_warmup_steps)
    return optim.lr


@dataclass
class StudentTraining:
    """What a training step needs: the DDP-wrapped student and its optimizer."""

    model: DistributedDataParallel
    optimizer: object  # MegatronOptimizer (ChainedOptimizer / DistributedOptimizer)
    optim_cfg: OptimConfig

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def wrap_student(student, optim: OptimConfig, parallel: ParallelConfig) -> StudentTraining:
    """DDP + optimizer around the student stage built by :func:`networks.build_student`."""
    config = student.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
            check_for_nan_in_grad=True,
        ),
        module=student,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    dtype = config.params_dtype
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        [ddp],
    )
    return StudentTraining(ddp, optimizer, optim)
