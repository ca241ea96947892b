"""The student's DDP wrapper, Megatron optimizer and learning-rate schedule.

DDP: Megatron's DistributedDataParallel with fp32 gradient buffers; with
``parallel.use_distributed_optimizer`` the Adam state and fp32 main weights are sharded over the
data-parallel ranks (Megatron DistributedOptimizer). Gradients are summed over DP and divided
by the global response-token count in ``finalize_model_grads`` (``calculate_per_token_loss``):
the update is the gradient of the token mean over the whole global batch, on every layout.
Adam is torch AdamW on CPU (no TE/Apex) and fused Adam on GPU; biases and norms have no weight
decay (Megatron's default rule).

With ``optim.offload_during_rollout`` the optimizer state and the gradient buffers wait in host
memory while the student decodes (:meth:`StudentTraining.offload_state`,
:mod:`trb_nemo.train.offload`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from trb_nemo.config.schema import OptimConfig, ParallelConfig
from trb_nemo.train.offload import HostOffload


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
    state_memory: HostOffload = field(init=False)
    """Where :meth:`offload_state` parks the state (enabled by ``optim.offload_during_rollout``)."""

    def __post_init__(self):
        self.state_memory = HostOffload("the student's optimizer state and gradients",
                                        "optim.offload_during_rollout",
                                        enabled=self.optim_cfg.offload_during_rollout)

    def set_lr(self, step: int) -> float:
        """Set step ``step``'s LR; the first call of a training step, so it refuses (one line)
        to start one while the optimizer state is offloaded."""
        self.state_memory.require_resident("an optimizer step")
        lr = lr_at(step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(what the optimizer step owns, the weights): the DDP gradient buffers (fp32; every
        ``param.main_grad`` is a view of them), and of each inner torch optimizer its
        parameters (the fp32 main params), their ``.grad`` and its state (Adam's ``exp_avg``,
        ``exp_avg_sq``, ``step``); then the student's parameters and buffers and the DDP weight
        buffers. Where the weights are fp32, the main params are the weights themselves
        (FP32Optimizer) or views of the DDP weight buffer (DistributedOptimizer): an offload
        keeps every storage of the second list, since the student decodes with them."""
        ddp = self.model
        owned: list[torch.Tensor] = []
        weights: list[torch.Tensor] = [*ddp.module.parameters(), *ddp.module.buffers()]
        for buffer in ddp.buffers + ddp.expert_parallel_buffers:
            owned.append(buffer.grad_data)
            owned.extend(getattr(buffer, "extra_main_grads", ()))
            if buffer.param_data is not None:
                weights.append(buffer.param_data)
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            torch_opt = getattr(inner, "optimizer", None)  # None: a stub (no params here)
            if torch_opt is None:
                continue
            for group in torch_opt.param_groups:
                for p in group["params"]:
                    owned.extend([p] if p.grad is None else [p, p.grad])
            for state in torch_opt.state.values():
                owned.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return owned, weights

    def offload_state(self) -> None:
        """Park the optimizer state, the fp32 main params that are not the weights, and the
        gradient buffers in host memory (no-op unless ``optim.offload_during_rollout``, or when
        already parked). Exact: :meth:`restore_state` brings back the same bits."""
        if not self.state_memory.enabled or self.state_memory.offloaded:
            return
        owned, weights = self.state_tensors()
        self.state_memory.offload(owned, keep=weights)

    def restore_state(self) -> None:
        """Bring back what :meth:`offload_state` parked (no-op when resident)."""
        self.state_memory.restore()


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
