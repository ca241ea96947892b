"""The student and the frozen teacher, with their weights, on this rank's TP/PP stage.

Weights come from, in order: ``spec.checkpoint`` (a Megatron folder, any saved layout), then
``spec.hf_path`` (HF safetensors, sliced for this rank), then a layout-independent random init
(:func:`hf_weights.random_hf_tensor` keyed by ``model.init_seed``, so TP=1, TP=2 and PP=2 runs
start from the same network). Specs must be resolved (:mod:`trb_nemo.models.resolve`).
"""

from __future__ import annotations

import torch

from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig
from trb_nemo.models import hf_weights
from trb_nemo.models.gpt import build_gpt
from trb_nemo.models.megatron_io import load_model
from trb_nemo.parallel.groups import ParallelGroups


def build_network(spec: ModelSpec, model_cfg: ModelConfig, parallel: ParallelConfig,
                  pg: ParallelGroups, init_seed: int | None = None):
    """This rank's stage of one network, weights loaded (see the module docstring).
    ``init_seed`` of the random init; None = ``model_cfg.init_seed``."""
    seed = model_cfg.init_seed if init_seed is None else init_seed
    model = build_gpt(spec, model_cfg, parallel, pg, initialize=False)
    if spec.checkpoint is not None:
        load_model(spec.checkpoint, model)
    else:
        if spec.hf_path is not None:
            get = hf_weights.SafetensorsReader(spec.hf_path)
        else:
            shapes = hf_weights.hf_shapes(spec)

            def get(name):
                return hf_weights.random_hf_tensor(name, shapes[name], seed)
        hf_weights.load_hf_tensors(model, spec, get, pg.tensor)
    return model


def build_student(model_cfg: ModelConfig, parallel: ParallelConfig, pg: ParallelGroups):
    """The trainable student stage (wrap it in DDP for training)."""
    return build_network(model_cfg.student, model_cfg, parallel, pg)


def build_teacher(model_cfg: ModelConfig, parallel: ParallelConfig, pg: ParallelGroups):
    """The frozen teacher stage: eval mode, no parameter requires grad, never wrapped in DDP nor
    given to an optimizer, so it holds only weights plus the current microbatch's activations.
    FP8 only under ``model.teacher_precision=fp8`` (:meth:`ModelConfig.for_teacher`)."""
    teacher = build_network(model_cfg.teacher, model_cfg.for_teacher(), parallel, pg,
                            model_cfg.init_seed + 1)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def is_frozen(model: torch.nn.Module) -> bool:
    """No parameter requires or holds a gradient."""
    return all(not p.requires_grad and p.grad is None for p in model.parameters())
