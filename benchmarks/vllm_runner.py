"""vLLM (CPU build) side of ``benchmarks/rollout.py`` part (d): tokens/s of ``LLM.generate``.

Runs under ``.venv-vllm/bin/python`` (``benchmarks/vllm_venv.sh`` builds it: vLLM pins another
torch than the project's venv), so it imports nothing of ``trb_nemo``. Reads one JSON job from
the file named by its argument::

    {"model": HF folder, "repeats": R, "dtype": "float32", "eager": false, "out": path,
     "shapes": [{"prompts": [[token ids], ...], "max_new": N}, ...]}

and writes ``{"vllm_version", "torch_version", "threads", "preloaded", "startup_s", "shapes":
[{"n", "max_new", "tok_s" (median), "seconds" (each timed run)}]}`` as JSON to ``out``
(stdout when absent; vLLM logs there too). Per shape: R + 1 ``generate`` calls over all the
prompts at once (the first warms up), each sequence sampled at temperature 1 with top-k/top-p
off, exactly N new tokens (``min_tokens = max_tokens = N``, ``ignore_eos``); only ``generate``
is timed, not the engine's start-up. Token-id prompts, no tokenizer
(``skip_tokenizer_init``), prefix caching off (repeats would reuse the prefills). Threads and
preloaded libraries: the caller's environment (part (d) sets ``OMP_NUM_THREADS=1``,
``VLLM_CPU_OMP_THREADS_BIND=nobind`` and ``LD_PRELOAD``); ``VLLM_CPU_KVCACHE_SPACE`` defaults
to 1 (GiB). ``"eager": true`` in the job: ``enforce_eager`` (no torch.compile step).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) + s["max_new"] for s in job["shapes"] for p in s["prompts"])
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job.get("dtype", "float32"),
              max_model_len=max(longest, 64), enable_prefix_caching=False, seed=0,
              max_num_seqs=max(len(s["prompts"]) for s in job["shapes"]),
              enforce_eager=bool(job.get("eager", False)))
    startup = time.perf_counter() - t0
    out = []
    for shape in job["shapes"]:
        n, max_new = len(shape["prompts"]), shape["max_new"]
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=max_new,
                                min_tokens=max_new, ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in shape["prompts"]]
        seconds = []
        for r in range(job["repeats"] + 1):
            t = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t
            got = [len(o.outputs[0].token_ids) for o in res]
            assert got == [max_new] * n, f"vLLM generated {sorted(set(got))} tokens, not {max_new}"
            if r > 0:  # the first run warms up
                seconds.append(elapsed)
        out.append({"n": n, "max_new": max_new, "seconds": seconds,
                     "tok_s": statistics.median(n * max_new / s for s in seconds)})
    result = json.dumps({"vllm_version": vllm.__version__, "torch_version": torch.__version__,
                         "startup_s": startup, "shapes": out,
                         "threads": {k: os.environ.get(k) for k in (
                             "OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                             "VLLM_CPU_KVCACHE_SPACE")},
                         "preloaded": [os.path.basename(lib)
                                       for lib in os.environ.get("LD_PRELOAD", "").split()]})
    if job.get("out"):
        with open(job["out"], "w") as f:
            f.write(result)
    else:
        print(result, flush=True)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this
    main()
