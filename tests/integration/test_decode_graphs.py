"""The decode steps that CUDA graphs replay (the `torch` backend's decode graphs): batches padded to
power-of-two buckets, block tables padded to a bucket width, inputs read from static buffers. On a
CPU the same padded step runs eagerly (`capture=False`), so everything but the recording itself is
checked here; on a GPU the whole suite runs with the graphs on (they are the default there)."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams
from framework.backend.cuda_graphs import CUDADecodeGraphs, bucket
from tests.conftest import GREEDY, make_tiny_checkpoint, random_prompts


def test_bucket_is_the_next_power_of_two_up_to_the_limit():
    assert [bucket(n, 128) for n in (1, 2, 3, 5, 33, 64, 65, 128)] == [1, 2, 4, 8, 64, 64, 128, 128]
    assert bucket(40, 48) == 48  # a limit that is not a power of two is a bucket of its own


def _generate(llm, prompts, max_tokens):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def torch_llm(tiny_dir, **options) -> LLM:
    return LLM(str(tiny_dir), backend="torch", **{"kv_cache.max_tokens": 4096, **options})


def use_graphs(llm, monkeypatch, on: bool, logits_in_graph: bool = True) -> None:
    """Have the engine's `torch` backend give it padded decode graphs (recorded on CUDA, run eagerly
    elsewhere), or none."""
    engine = llm.executor.model_engine
    backend, max_batch = engine.backend, engine.backend.config.cuda_graph_max_batch

    def graphs(model, kv_caches, block_size, max_model_len):
        if not on:
            return None
        max_blocks = -(-max_model_len // block_size)
        capture = backend.device.type == "cuda"
        return CUDADecodeGraphs(model, kv_caches, block_size, max_batch, max_blocks, capture, logits_in_graph)

    monkeypatch.setattr(backend, "decode_graphs", graphs)
    engine._graphs = (None, None)


def test_cuda_graphs_are_the_torch_backends_decode_graphs_on_cuda_only(tiny_dir):
    llm = torch_llm(tiny_dir)
    engine = llm.executor.model_engine
    graphs = engine.backend.decode_graphs(engine.model, llm.executor.kv_cache_manager.get_kv_caches(), 16, 1024)
    assert (graphs is not None) == (engine.device.type == "cuda")
    assert isinstance(graphs, CUDADecodeGraphs) or graphs is None
    off = torch_llm(tiny_dir, **{"engine.cuda_graphs": False}).executor.model_engine
    assert off.backend.decode_graphs(off.model, llm.executor.kv_cache_manager.get_kv_caches(), 16, 1024) is None


@pytest.mark.parametrize("tp", [1, 2])
def test_under_tensor_parallelism_the_cuda_graphs_leave_the_lm_head_out(tp):
    import torch
    from omegaconf import OmegaConf

    from framework.backend.torch_backend import TorchBackend

    backend = TorchBackend(OmegaConf.create({"tensor_parallel_size": tp}), None, torch.device("cuda"), torch.float32)
    cache = torch.empty(2, 64, 16, 8, device="meta")  # (no GPU needed to build them)
    graphs = backend.decode_graphs(None, [(cache, cache)], 16, 1024)
    assert isinstance(graphs, CUDADecodeGraphs) and graphs.logits_in_graph == (tp == 1)


def test_the_lm_head_after_the_graph_computes_the_requests_rows_only(tiny_dir, monkeypatch):
    llm = torch_llm(tiny_dir, **{"kv_cache.block_size": 8})
    prompts = random_prompts([3, 9, 17, 30, 41], seed=5)  # decode batches of 5 (bucket 8) down to 1
    max_tokens = [15, 4, 9, 2, 3]
    use_graphs(llm, monkeypatch, on=False)
    expected = _generate(llm, prompts, max_tokens)

    use_graphs(llm, monkeypatch, on=True, logits_in_graph=False)
    model, events = llm.executor.model_engine.model, []
    head, run = model.compute_logits, CUDADecodeGraphs.run

    def spy_head(hidden):
        events.append(("head", len(hidden)))
        return head(hidden)

    def spy_run(self, tokens, positions, tables, query_len=1):
        events.append(("run", len(tokens)))
        return run(self, tokens, positions, tables)

    monkeypatch.setattr(model, "compute_logits", spy_head)
    monkeypatch.setattr(CUDADecodeGraphs, "run", spy_run)
    assert _generate(llm, prompts, max_tokens) == expected
    steps = [(n, events[i + 1]) for i, (what, n) in enumerate(events) if what == "run"]
    assert {n for n, _ in steps} >= {5, 3, 1}
    assert all(after == ("head", n) for n, after in steps)  # an LM head after each step, on its requests' rows


def test_padded_decode_steps_match_the_packed_path(tiny_dir, monkeypatch):
    llm = torch_llm(tiny_dir, **{"kv_cache.block_size": 8})
    # 5 requests (bucket 8, three padding rows), finishing at different steps (buckets 4, 2, 1),
    # with block tables of 1 to 7 blocks (widths 1 to 8)
    prompts = random_prompts([3, 9, 17, 30, 41], seed=5)
    max_tokens = [15, 4, 9, 2, 3]
    use_graphs(llm, monkeypatch, on=False)
    expected = _generate(llm, prompts, max_tokens)

    use_graphs(llm, monkeypatch, on=True)
    steps = []
    original = CUDADecodeGraphs.run

    def spy(self, tokens, positions, tables, query_len=1):
        assert query_len == 1  # CUDA graphs cover decode steps only
        steps.append((bucket(len(tokens), self.max_batch), bucket(max(map(len, tables)), self.max_blocks)))
        return original(self, tokens, positions, tables)

    monkeypatch.setattr(CUDADecodeGraphs, "run", spy)
    assert _generate(llm, prompts, max_tokens) == expected
    assert {b for b, _ in steps} >= {8, 4, 1} and len({w for _, w in steps}) >= 2
    assert llm.executor.kv_cache_manager.num_free_blocks == llm.executor.kv_cache_manager.get_max_resource_count()


def test_padded_decode_steps_of_sliding_window_and_soft_capped_layers_match(tmp_path, tokenizer_dir, monkeypatch):
    # the graphs' decode metadata gives the window its query positions, and padding rows stay harmless
    path = make_tiny_checkpoint(
        tmp_path / "gemma2", tokenizer_dir, family="gemma2", head_dim=16, sliding_window=8, attn_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"],
    )
    llm = torch_llm(path, **{"kv_cache.block_size": 4})
    prompts = random_prompts([3, 20, 11], seed=8)
    max_tokens = [14, 5, 9]
    use_graphs(llm, monkeypatch, on=False)
    expected = _generate(llm, prompts, max_tokens)
    use_graphs(llm, monkeypatch, on=True)
    assert _generate(llm, prompts, max_tokens) == expected


def test_steps_beyond_the_largest_bucket_run_eagerly(tiny_dir, monkeypatch):
    llm = torch_llm(tiny_dir, **{"engine.cuda_graph_max_batch": 2})
    use_graphs(llm, monkeypatch, on=False)
    prompts = random_prompts([5, 6, 7], seed=6)
    expected = _generate(llm, prompts, [6, 6, 3])
    use_graphs(llm, monkeypatch, on=True)
    assert _generate(llm, prompts, [6, 6, 3]) == expected  # 3 rows: eager; then 2 rows: the graphs
    graphs = llm.executor.model_engine._graphs[1]
    assert graphs is not None and graphs.max_batch == 2


def test_padding_rows_leave_other_blocks_untouched(tiny_dir, monkeypatch):
    """A padded step writes each request's K/V to its own slot and nothing else. (The caches are
    filled with a large finite marker, not NaN: the PyTorch attention multiplies whole blocks and
    masks afterwards, and a NaN would survive the mask.)"""
    llm = torch_llm(tiny_dir, **{"kv_cache.max_tokens": 512, "kv_cache.block_size": 4})
    use_graphs(llm, monkeypatch, on=True)
    kv = llm.executor.kv_cache_manager
    for k_cache, v_cache in kv.get_kv_caches():
        k_cache.fill_(1000.0)
        v_cache.fill_(1000.0)
    prompts = random_prompts([6, 11, 2], seed=7)
    outputs = _generate(llm, prompts, [5, 5, 5])
    assert all(len(o) == 5 for o in outputs)
    written = sum(len(p) + 4 for p in prompts)  # the last sampled token is never written
    for k_cache, v_cache in kv.get_kv_caches():
        for cache in (k_cache, v_cache):
            slots = (cache[0] != 1000.0).any(-1).sum().item()  # [blocks, block_size] of head 0
            assert slots == written


def test_a_largest_bucket_below_one_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="cuda_graph_max_batch must be >= 1"):
        torch_llm(tiny_dir, **{"engine.cuda_graph_max_batch": 0})
