"""`trb-nemo convert`: HF safetensors <-> Megatron checkpoints (Qwen3, Qwen2, Llama).

hf-to-megatron: every rank builds its TP/PP stage, reads only the HF tensors it needs (lazily,
per tensor), keeps its slices, and the ranks save one dist_checkpointing folder together. The
folder records the architecture and the source config.json and loads at any TP/PP layout.

megatron-to-hf: every rank loads its stage; the TP ranks of data-parallel rank 0 all-gather
each stage's tensors and TP rank 0 writes ``model-<stage>-of-<PP>.safetensors``; global rank 0
writes the index, ``config.json`` (every key of the source one when the checkpoint came from HF,
e.g. ``max_position_embeddings`` and ``pad_token_id``, the architecture from the weights) and
copies the tokenizer files and generation_config.json from the source HF folder when it still
exists (else a generation_config.json with the network's stop id). ``--checkpoint`` may name a
run folder (or its ``checkpoints/``): its newest complete ``step_*`` is exported.
``transformers`` loads the result.

Run on ``--tp x --pp`` local ranks (gloo on CPU) or under torchrun/srun with that world size.
Inputs are checked before any rank starts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from trb_nemo.config.schema import ConfigError, ModelConfig, ModelSpec, ParallelConfig
from trb_nemo.models.folders import newest_checkpoint, read_model_meta
from trb_nemo.models.hf_config import (
    check_hf_weights,
    hf_config_from_spec,
    model_eos_token_id,
    read_config_json,
    spec_from_hf_config,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "tokenizer.model")


@dataclasses.dataclass
class ConvertJob:
    """One conversion, validated before any rank starts."""

    direction: str  # "hf-to-megatron" | "megatron-to-hf"
    source: str
    out: str
    spec: ModelSpec
    parallel: ParallelConfig
    precision: str = "fp32"
    hf_config: dict | None = None
    source_hf_path: str | None = None


def plan(direction: str, source: str, out: str, tp: int = 1, pp: int = 1,
         precision: str = "fp32") -> ConvertJob:
    """Validate the inputs (ConfigError naming the flag) and describe the job."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              num_local_ranks=tp * pp)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError("--out", f"{out!r} exists and is not empty; choose a new folder")
    if direction == "hf-to-megatron":
        hf = read_config_json(source, "--hf-path")
        spec = spec_from_hf_config(hf, ModelSpec(name=Path(source).name, hf_path=source),
                                   "--hf-path")
        spec = dataclasses.replace(spec, eos_token_id=_eos(source, hf, spec))
        check_hf_weights(source, "--hf-path")  # after the architecture: the first question
        job = ConvertJob(direction, source, out, spec, parallel, precision, hf, source)
    elif direction == "megatron-to-hf":
        source = intact_checkpoint(source)
        meta = read_model_meta(source, "--checkpoint")
        spec = ModelSpec(**meta["spec"])
        hf_path = meta["spec"].get("hf_path")
        hf_config = meta.get("hf_config")
        if hf_config is None and hf_path and (Path(hf_path) / "config.json").is_file():
            hf_config = read_config_json(hf_path, "--checkpoint")  # a training checkpoint
        job = ConvertJob(direction, source, out, spec, parallel, precision, hf_config, hf_path)
    else:
        raise ConfigError("direction", f"must be hf-to-megatron|megatron-to-hf, got {direction!r}")
    heads, groups = spec.num_attention_heads, spec.num_query_groups or spec.num_attention_heads
    if heads % tp or groups % tp:
        raise ConfigError("--tp", f"must divide the {heads} attention heads and {groups} query groups")
    if spec.num_layers % pp:
        raise ConfigError("--pp", f"must divide the {spec.num_layers} layers")
    return job


def intact_checkpoint(folder: str) -> str:
    """The checkpoint ``--checkpoint`` names, verified (sizes and checksums: the export reads
    every byte anyway): a checkpoint folder must be intact; for a run folder (or its
    ``checkpoints/``) the newest intact ``step_*``, one warning line per damaged newer one.
    ConfigError(--checkpoint) when there is none, before any rank starts."""
    import sys

    from trb_nemo.models.folders import CHECKPOINTS, MODEL_META, complete_checkpoints
    from trb_nemo.models.megatron_io import verify_checkpoint

    path = Path(folder)
    if (path / MODEL_META).is_file() or not path.is_dir():
        read_model_meta(folder, "--checkpoint")  # says what is wrong with a non-checkpoint
        reason = verify_checkpoint(path)
        if reason is not None:
            raise ConfigError("--checkpoint", f"{folder!r} is damaged: {reason}; export another "
                              "checkpoint (a run folder: its newest intact one)")
        return folder
    newest_checkpoint(folder)  # ConfigError when it holds no complete checkpoint at all
    found = sorted(complete_checkpoints(path) + complete_checkpoints(path / CHECKPOINTS))
    damaged = []
    for _, candidate in reversed(found):
        reason = verify_checkpoint(candidate)
        if reason is None:
            for name, why in damaged:
                print(f"trb-nemo: skipping {name}, damaged: {why}", file=sys.stderr, flush=True)
            return str(candidate)
        damaged.append((candidate.name, reason))
    listed = "; ".join(f"{name}: {why}" for name, why in damaged)
    raise ConfigError("--checkpoint", f"every checkpoint in {folder!r} is damaged ({listed})")


def _eos(folder: str, hf: dict, spec: ModelSpec) -> int | None:
    """The model's own stop id (generation_config.json, else config.json), recorded in the
    Megatron folder; None when it names none inside the vocabulary (training then asks for
    ``model.<role>.eos_token_id``)."""
    eos = model_eos_token_id(folder, hf)[0]
    return eos if eos is not None and 0 <= eos < spec.vocab_size else None


def run_rank(job: ConvertJob) -> dict:
    """The conversion on one rank (groups are initialized here and torn down at the end)."""
    from trb_nemo.logs import quiet_third_party

    quiet_third_party()
    from trb_nemo.parallel import groups

    pg = groups.initialize(job.parallel, seed=0)
    try:
        return convert_on_rank(job, pg)
    finally:
        groups.destroy()


def convert_on_rank(job: ConvertJob, pg) -> dict:
    """The conversion on one rank of an initialized job of TP x PP ranks (collective over the
    world; ``pg`` the job's :class:`~trb_nemo.parallel.groups.ParallelGroups`)."""
    model_cfg = ModelConfig(precision=job.precision, teacher=None)
    if job.direction == "hf-to-megatron":
        return _hf_to_megatron(job, model_cfg, pg)
    return _megatron_to_hf(job, model_cfg, pg)


def _hf_to_megatron(job: ConvertJob, model_cfg: ModelConfig, pg) -> dict:
    from trb_nemo.models.megatron_io import save_model
    from trb_nemo.models.networks import build_network

    model = build_network(job.spec, model_cfg, job.parallel, pg)
    save_model(job.out, model, dataclasses.replace(job.spec, checkpoint=None), job.hf_config)
    return {"out": job.out, "params_local": sum(p.numel() for p in model.parameters())}


def _megatron_to_hf(job: ConvertJob, model_cfg: ModelConfig, pg) -> dict:
    from safetensors.torch import save_file

    from trb_nemo.models.hf_weights import hf_tensors
    from trb_nemo.models.networks import build_network
    from trb_nemo.parallel import comm

    spec = dataclasses.replace(job.spec, checkpoint=job.source)
    model = build_network(spec, model_cfg, job.parallel, pg)
    out = Path(job.out)
    pp, stage = pg.pp_size, pg.pp_rank
    if comm.world_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    if pg.dp_rank == 0:
        tensors = hf_tensors(model, job.spec, pg.tensor)
        if pg.tp_rank == 0:
            save_file(tensors, str(out / f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"),
                      metadata={"format": "pt"})
    comm.barrier()
    if comm.world_rank() == 0:
        _write_hf_folder(job, out)
    comm.barrier()
    return {"out": job.out}


def _write_hf_folder(job: ConvertJob, out: Path) -> None:
    from safetensors import safe_open

    weight_map = {}
    for f in sorted(out.glob("model-*.safetensors")):
        with safe_open(f, framework="pt") as h:
            weight_map.update({k: f.name for k in h.keys()})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = hf_config_from_spec(job.spec, job.hf_config)
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    src = Path(job.source_hf_path) if job.source_hf_path else None
    for name in TOKENIZER_FILES:
        if src is not None and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / "generation_config.json").is_file() and job.spec.eos_token_id is not None:
        generation = {k: config[k] for k in ("bos_token_id", "pad_token_id") if k in config}
        (out / "generation_config.json").write_text(json.dumps(
            {**generation, "eos_token_id": job.spec.eos_token_id}, indent=2, sort_keys=True))


def main(args) -> int:
    """`trb-nemo convert hf-to-megatron|megatron-to-hf ...`: plan (every check before a rank
    starts), then convert on ``--tp`` x ``--pp`` local ranks (or this rank under torchrun)."""
    from trb_nemo.parallel.env import launched_externally
    from trb_nemo.parallel.spawn import run_local_ranks

    source = args.hf_path if args.direction == "hf-to-megatron" else args.checkpoint
    if source is None:
        flag = "--hf-path" if args.direction == "hf-to-megatron" else "--checkpoint"
        raise ConfigError(flag, f"is required for {args.direction}")
    job = plan(args.direction, source, args.out, args.tp, args.pp, args.precision)
    if job.source != source:
        print(f"trb-nemo: {source} is not a checkpoint itself: exporting its newest intact one, "
              f"{job.source}", flush=True)
    if launched_externally():
        run_rank(job)
    else:
        run_local_ranks(run_rank, job.parallel.local_world_size, (job,))
    print(f"trb-nemo: wrote {args.out} ({args.direction}, TP={args.tp} PP={args.pp})")
    return 0
