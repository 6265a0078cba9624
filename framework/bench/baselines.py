"""The peers: transformers `generate` (one padded static batch) and transformers continuous
batching (`generate_batch`), on the same dense weights, dtype and threads."""

from __future__ import annotations

import time

import torch

from framework.bench.workloads import Workload


def load_reference(checkpoint_dir, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, as in the workloads
    return model


@torch.inference_mode()
def static_generate(model, workload: Workload, pad_id: int) -> float:
    """Seconds for one left-padded batch; every row runs to the longest output length."""
    device = model.device
    longest = max(len(p) for p in workload.prompts)
    ids = torch.full((len(workload.prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(workload.prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    started = time.perf_counter()
    model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max(workload.output_lens),
        do_sample=False,
        pad_token_id=pad_id,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


@torch.inference_mode()
def continuous_generate(model, workload: Workload) -> float:
    """Seconds for transformers' continuous batching, one request per prompt with its own length."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(workload.output_lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        for _ in workload.prompts:
            if manager.get_result(timeout=600) is None:
                raise RuntimeError("transformers continuous batching returned no result")
        elapsed = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    return elapsed
