"""Every registered built-in of every kind with a conformance check (the `conformance` entry of
`framework.plugins.kinds.KINDS`) passes each case of it; and each check fails a component that
breaks the contract it checks."""

import subprocess
import sys

import pytest

from framework import LLM, SamplingParams
from framework.config import GROUPS
from framework.decoder.greedy import GreedyDecoder
from framework.plugins import conformance
from framework.plugins.kinds import KINDS, load
from framework.plugins.manager import create_plugin_manager
from framework.resources.paged_kv_cache import PagedKVCacheManager
from framework.scheduler.capacity import GuaranteedNoEvictScheduler
from framework.scheduler.micro_batch import FCFSMicroBatchScheduler
from framework.testing import conformance_suite

PLUGINS = create_plugin_manager(autoload=False)
CHECKS = {kind.name: load(kind.conformance) for kind in KINDS.values() if kind.conformance}

CASES = [(kind, entry.name, case) for kind, check in CHECKS.items() for entry in PLUGINS[kind] for case in check.cases]


def builtin_config(kind, entry):
    """A built-in's default settings; the draft model's name a tiny checkpoint of the fake engine's
    vocabulary (it has no default)."""
    if (kind, entry.name) == ("drafter", "draft_model"):
        from framework.drafter.config import DraftCheckpoint, DraftModelConfig
        from framework.testing import tiny_checkpoint

        return DraftModelConfig(DraftCheckpoint(str(tiny_checkpoint(vocab_size=1024))))
    return entry.config() if entry.config else None


@pytest.mark.parametrize("kind, name, case", CASES)
def test_builtin_conforms(kind, name, case):
    entry = PLUGINS[kind].get(name)
    CHECKS[kind].cases[case](entry.load(), builtin_config(kind, entry))


def test_the_testing_module_imports_neither_torch_nor_the_executor():
    code = (
        "import sys, framework.testing, framework.plugins.conformance;"
        "heavy = {'torch', 'framework.executor.py_executor'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_kind_with_a_check_has_builtins():
    assert {"capacity_scheduler", "micro_batch_scheduler", "kv_cache_manager", "decoder", "model_engine"} <= set(CHECKS)
    for kind in CHECKS:
        assert PLUGINS[kind].names(), kind


def test_the_workload_exercises_what_the_checks_are_for():
    """With the reference components under the tight budgets, the workload chunks prompts, makes
    requests wait for blocks and reuses prefixes; max_utilization preempts; drafts save steps."""
    from framework.testing import FakeEngine, OracleDrafter, make_executor, make_scheduler, run_to_completion

    tight = conformance.TIGHT.budgets
    requests = conformance.workload()
    assert max(r.prompt_len for r in requests) > tight["max_num_tokens"]  # chunked prefill
    executor = make_executor(**tight)
    trace = run_to_completion(executor, requests)
    unfinished = [len(requests) - len(trace.finished[: sum(len(s.finished) for s in trace.steps[:i])]) for i in range(len(trace.steps))]
    assert any(len(step.fitting) < left for step, left in zip(trace.steps, unfinished))  # some wait
    assert executor.kv_cache_manager.stats().prefix_hit_tokens > 0

    max_utilization = make_scheduler("framework.scheduler.capacity:MaxUtilizationScheduler", **tight)
    assert run_to_completion(make_executor(capacity=max_utilization, **tight), conformance.workload()).preemptions

    engine = FakeEngine()
    drafter = OracleDrafter(engine.next_token, engine.vocab_size)
    drafted = run_to_completion(make_executor(engine=engine, drafter=drafter, **tight), conformance.workload())
    assert len(drafted.steps) < len(trace.steps)


# ---- each check fails what it is meant to catch -----------------------------------------------
def test_a_scheduler_that_ignores_the_cache_fails():
    class AdmitsEverything(GuaranteedNoEvictScheduler):
        def schedule(self, active, kv_cache):
            out = super().schedule(active, kv_cache)
            out.fitting = list(active)
            return out

    with pytest.raises(AssertionError, match="failed: .*NoFreeBlocksError"):
        conformance.check_capacity_scheduler(AdmitsEverything)


def test_a_scheduler_that_preempts_a_queued_request_fails():
    class PreemptsTheQueue(GuaranteedNoEvictScheduler):
        def schedule(self, active, kv_cache):
            out = super().schedule(active, kv_cache)
            out.preempted = [r for r in active if r not in out.fitting][:1]
            return out

    with pytest.raises(AssertionError, match="preempted a queued request"):
        conformance.check_capacity_scheduler(PreemptsTheQueue)


def test_a_micro_batch_scheduler_over_the_token_budget_fails():
    class OneTokenTooMany(FCFSMicroBatchScheduler):
        def __init__(self, scheduler_config, config=None):
            super().__init__(scheduler_config, config)
            self.max_num_tokens += 1

    with pytest.raises(AssertionError, match="computed 17 tokens; max_num_tokens=16"):
        conformance.check_micro_batch_scheduler.cases["tight_budgets"](OneTokenTooMany, None)


def test_a_micro_batch_scheduler_that_sets_chunks_itself_fails():
    class WritesOnRequests(FCFSMicroBatchScheduler):
        def schedule(self, fitting):
            plan = super().schedule(fitting)
            for chunk in plan:
                chunk.request.num_scheduled_tokens = chunk.num_tokens
            return plan

    with pytest.raises(AssertionError, match="set num_scheduled_tokens itself"):
        conformance.check_micro_batch_scheduler.cases["tight_budgets"](WritesOnRequests, None)


def test_a_cache_that_keeps_blocks_fails():
    class LosesTheLastBlock(PagedKVCacheManager):
        def free_resources(self, request):
            table = self.block_tables.get(request.request_id)
            if table:
                table.pop()  # never released
            super().free_resources(request)

    with pytest.raises(AssertionError, match="blocks leaked|unfinished after"):
        conformance.check_kv_cache_manager.cases["no_preemption"](LosesTheLastBlock, None)


def test_a_cache_that_reuses_the_wrong_prefix_fails():
    class KeysIgnoreTokens(PagedKVCacheManager):
        def _block_key(self, parent, tokens):  # every request's first block looks alike
            return (hash(parent),)

    with pytest.raises(AssertionError, match="holds token .* the block table points at a block holding other tokens"):
        conformance.check_kv_cache_manager.cases["tight_budgets"](KeysIgnoreTokens, None)


def test_a_cache_that_waits_for_what_never_fits_fails():
    class NeverRefuses(PagedKVCacheManager):
        def never_fits(self, request):
            return None

    with pytest.raises(AssertionError, match="unfinished|not refused"):
        conformance.check_kv_cache_manager.cases["refuses_what_never_fits"](NeverRefuses, None)


class Biased(GreedyDecoder):
    """Greedy over logits with a bias towards token 7."""

    def decode(self, requests, logits):
        return super().decode(requests, self.bias(logits))

    @staticmethod
    def bias(logits):
        logits = logits.clone()
        logits[:, 7] += 100.0
        return logits


def test_a_decoder_that_changes_the_distribution_unannounced_fails():
    with pytest.raises(AssertionError, match="not the argmax of the"):
        conformance.check_decoder.cases["greedy_is_the_argmax"](Biased, None)


def test_a_decoder_that_declares_its_transform_passes():
    class DeclaredBias(Biased):
        def processed_logits(self, requests, logits):
            return self.bias(logits)

    conformance.check_decoder(DeclaredBias)


def test_a_decoder_that_ignores_the_seed_fails():
    import torch

    from framework.decoder.base import Decoder, DecoderOutput

    class OneStream(Decoder):  # every request draws from the decoder's one generator
        def __init__(self, decoder_config, config=None, seed=0):
            super().__init__(decoder_config, config, seed)
            self.generator = torch.Generator().manual_seed(seed)

        def decode(self, requests, logits):
            if not requests:
                return DecoderOutput([])
            drawn = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator).squeeze(-1)
            greedy = torch.tensor([r.sampling_params.temperature == 0 for r in requests])
            return DecoderOutput(torch.where(greedy, logits.argmax(-1), drawn).tolist())

    with pytest.raises(AssertionError, match=r"\(seed \d+\) drew .* in one batch and .* in another"):
        conformance.check_decoder.cases["seeded_sampling_ignores_the_batch"](OneStream, None)


# ---- as a plugin author runs it ----------------------------------------------------------------
test_suite_for_a_plugin_class = conformance_suite("capacity_scheduler", "framework.scheduler.capacity:StaticBatchScheduler")


def test_a_kind_without_a_check_is_refused():
    with pytest.raises(ValueError, match="backend has no conformance check; kinds with one: capacity_scheduler"):
        conformance_suite("backend", object)


# ---- every built-in option composes and builds -------------------------------------------------
OPTIONS = [(group, kind, e.name) for group, (_, fields) in GROUPS.items() for kind in fields for e in PLUGINS[kind]]


@pytest.mark.parametrize("group, kind, name", OPTIONS)
def test_every_builtin_option_composes_and_builds(tiny_dir, group, kind, name):
    draft = {"speculative.model.path": str(tiny_dir)} if name == "draft_model" else {}  # the model as its own draft
    llm = LLM(str(tiny_dir), plugins=PLUGINS, **{group: name, "kv_cache.max_tokens": 128}, **draft)
    for built_kind in {kind for _, fields in GROUPS.values() for kind in fields}:
        assert isinstance(getattr(llm.executor, built_kind), KINDS[built_kind].base_class()), built_kind
    assert type(getattr(llm.executor, kind)) is PLUGINS[kind].get(name).load()
    out = llm.generate([4, 5, 6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
