"""HF <-> Megatron conversion for Qwen3, Qwen2 and Llama: tiny random models made with
`transformers` give the same logits after conversion at TP=1, TP=2 and PP=2, and export back
to HF reloads in `transformers` with the same weights and logits.

Run: .venv/bin/python -m pytest tests/dist/test_convert.py
"""

import pytest
import torch
from harness import spawn_bare

pytestmark = pytest.mark.dist

VOCAB, SEQ = 100, 48  # vocab 100 pads to 128 (TP=1) / 256 (TP=2)
FAMILIES = ("qwen3", "qwen2", "llama")


def make_hf(family: str, folder: str) -> None:
    """A tiny random HF checkpoint of one family (fp32 safetensors + config.json)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6)
    if family == "qwen3":  # QK norm, tied embeddings, head_dim != hidden / heads
        cfg = transformers.Qwen3Config(**common, head_dim=24, rope_theta=5000.0,
                                       tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen2":  # QKV biases, untied
        cfg = transformers.Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    else:  # Llama 3.1 RoPE scaling, untied
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(hash(family) % 1000)
    model = cls(cfg).float()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(10.0)  # sharp attention: position (RoPE) mistakes change the logits
    model.save_pretrained(folder)


def hf_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def convert_and_run(tp: int, pp: int, root: str, export: bool):
    """On each rank: import every family at this layout, run the converted model, export."""
    import dataclasses

    import torch.distributed as dist

    from trb_nemo.commands.convert import convert_on_rank, plan
    from trb_nemo.models.networks import build_network
    from trb_nemo.models.pipeline import run_schedule
    from trb_nemo.parallel import groups

    out = {}
    for family in FAMILIES:
        src, mg = f"{root}/{family}-hf", f"{root}/{family}-mg-tp{tp}pp{pp}"
        job = plan("hf-to-megatron", src, mg, tp, pp)
        if family == FAMILIES[0]:
            pg = groups.initialize(job.parallel, seed=0)
        convert_on_rank(job, pg)
        spec = dataclasses.replace(job.spec, checkpoint=mg)
        from trb_nemo.config.schema import ModelConfig

        model = build_network(spec, ModelConfig(precision="fp32", teacher=None), job.parallel,
                              pg).eval()
        with torch.no_grad():
            res = run_schedule(model, [{"tokens": tokens()}], lambda i, mb, z: z.detach(), pg,
                               forward_only=True)
        if res:  # last stage: gather the vocab shards
            local = res[0].contiguous()
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local, group=pg.tensor)
            out[family] = torch.cat(parts, dim=-1)[..., :VOCAB]
        if export:
            back = plan("megatron-to-hf", mg, f"{root}/{family}-back-tp{tp}pp{pp}", tp, pp)
            convert_on_rank(back, pg)
    dist.barrier()
    groups.destroy()
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    for family in FAMILIES:
        make_hf(family, f"{root}/{family}-hf")
    return str(root), {f: hf_logits(f"{root}/{f}-hf", tokens()) for f in FAMILIES}


@pytest.mark.parametrize("tp,pp,export", [(1, 1, False), (2, 1, True), (1, 2, True)],
                         ids=["tp1", "tp2", "pp2"])
def test_converted_logits_match_hf(hf_models, tp, pp, export):
    root, reference = hf_models
    results = spawn_bare(convert_and_run, tp * pp, tp, pp, root, export)
    last = results[-1]  # the last rank holds the last stage
    for family in FAMILIES:
        diff = (last[family] - reference[family]).abs().max().item()
        assert diff <= 1e-4, f"{family} TP={tp} PP={pp}: max |logits - HF| = {diff}"
        assert reference[family].abs().max() > 0.1  # logits are not trivially small
    if export:
        import transformers
        from safetensors.torch import load_file  # noqa: F401 - transformers reads it

        for family in FAMILIES:
            back = f"{root}/{family}-back-tp{tp}pp{pp}"
            diff = (hf_logits(back, tokens()) - reference[family]).abs().max().item()
            assert diff <= 1e-5, f"{family}: exported model logits differ by {diff}"
            a = transformers.AutoModelForCausalLM.from_pretrained(f"{root}/{family}-hf").state_dict()
            b = transformers.AutoModelForCausalLM.from_pretrained(back).state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"{family}: {k} changed in the round trip"
