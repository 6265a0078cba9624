"""The priority capacity scheduler: exact admission and preemption decisions against framework's
real paged KV cache manager (tiny sizes, CPU), its registration, and its Hydra config."""

from __future__ import annotations

import subprocess
import sys

import pytest

import framework_priority
from framework.plugins.manager import create_plugin_manager
from framework.scheduler.base import CapacityScheduler
from framework.testing import ids, make_executor, make_scheduler, req, run_to_completion, start, tiny_kv_cache
from framework_priority.config import PriorityConfig
from framework_priority.scheduler import PriorityScheduler, request_priority

# Pools of blocks of 4 tokens. A request of `req`'s default size (prompt 8, max_tokens 4) caches at
# most 11 tokens: 3 blocks to completion.


# ---- request priority ---------------------------------------------------------------------------


def test_priority_comes_from_request_then_sampling_params_then_default():
    plain = req("plain")
    assert request_priority(plain, 7) == 7
    via_params = req("params")
    via_params.sampling_params.priority = 2
    assert request_priority(via_params, 7) == 2
    via_params.priority = -1  # set on the request itself: wins over the SamplingParams attribute
    assert request_priority(via_params, 7) == -1
    assert make_scheduler(PriorityScheduler, PriorityConfig(default_priority=5)).priority(plain) == 5
    assert make_scheduler(PriorityScheduler).priority(plain) == 0  # config None -> PriorityConfig() defaults


def test_a_non_integer_priority_falls_back_to_the_default_with_a_warning(caplog):
    bad = req("bad")
    bad.sampling_params.priority = "high"
    with pytest.raises(TypeError, match="'bad'.*integer"):
        request_priority(bad, 0)
    scheduler = make_scheduler(PriorityScheduler, PriorityConfig(default_priority=3))
    with caplog.at_level("WARNING"):
        assert scheduler.priority(bad) == 3
        assert scheduler.priority(bad) == 3
    assert sum("bad" in m for m in caplog.messages) == 1  # warned once per request


def test_is_a_capacity_scheduler_with_the_group_settings():
    scheduler = make_scheduler(PriorityScheduler, PriorityConfig(preempt=False), max_batch_size=3, max_num_tokens=10)
    assert isinstance(scheduler, CapacityScheduler)
    assert (scheduler.max_batch_size, scheduler.max_num_tokens) == (3, 10)
    assert scheduler.config == PriorityConfig(default_priority=0, preempt=False)


# ---- admission ----------------------------------------------------------------------------------


def test_admits_in_priority_order_while_blocks_to_completion_fit():
    kv = tiny_kv_cache(32)  # 8 blocks; each request needs 3
    a, b, c = req("a", priority=2), req("b", priority=0), req("c", priority=1)
    out = make_scheduler(PriorityScheduler).schedule([a, b, c], kv)
    assert ids(out.fitting) == ["b", "c"]  # 6 blocks; "a" (3 more) does not fit in the 2 left
    assert out.preempted == []


def test_equal_priorities_are_admitted_in_arrival_order():
    kv = tiny_kv_cache(32)
    a, b, c = req("a"), req("b"), req("c")
    assert ids(make_scheduler(PriorityScheduler).schedule([a, b, c], kv).fitting) == ["a", "b"]


def test_running_requests_keep_their_reservation():
    kv = tiny_kv_cache(32)
    running = req("running", prompt_len=4, max_tokens=9, priority=0)  # 12 cached tokens: 3 blocks
    start(kv, running)  # holds 1 block, needs 2 more to completion
    assert kv.num_free_blocks == 7
    a, b = req("a", priority=0), req("b", priority=0)
    out = make_scheduler(PriorityScheduler).schedule([running, a, b], kv)
    assert ids(out.fitting) == ["running", "a"]  # 7 - 2 reserved = 5: room for one 3-block request


def test_fitting_is_in_priority_order_running_and_admitted_together():
    kv = tiny_kv_cache(max_tokens=64)  # 16 blocks
    low, mid = req("low", priority=5), req("mid", priority=3)
    start(kv, low, mid)
    top, also_mid = req("top", priority=-1), req("also_mid", priority=3)
    out = make_scheduler(PriorityScheduler).schedule([low, mid, top, also_mid], kv)
    assert ids(out.fitting) == ["top", "mid", "also_mid", "low"]


def test_a_blocked_important_request_blocks_the_less_important_ones_behind_it():
    kv = tiny_kv_cache(32)
    r1, r2 = req("r1", priority=0), req("r2", priority=0)
    start(kv, r1, r2)  # 6 blocks held or reserved; 2 left
    big = req("big", priority=0)  # 3 blocks: does not fit; r1, r2 are as important: no preemption
    small = req("small", prompt_len=2, max_tokens=2, priority=9)  # 1 block: would fit
    out = make_scheduler(PriorityScheduler).schedule([r1, r2, big, small], kv)
    assert ids(out.fitting) == ["r1", "r2"]
    assert out.preempted == []


def test_respects_max_batch_size():
    kv = tiny_kv_cache(max_tokens=128)
    reqs = [req(f"r{i}", priority=i % 2) for i in range(5)]
    out = make_scheduler(PriorityScheduler, max_batch_size=3).schedule(reqs, kv)
    assert ids(out.fitting) == ["r0", "r2", "r4"]


# ---- preemption ---------------------------------------------------------------------------------


def test_preempts_the_least_important_running_request_for_a_more_important_one():
    kv = tiny_kv_cache(32)
    low, mid = req("low", priority=5), req("mid", priority=1)
    start(kv, low, mid)  # 2 blocks held + 1 reserved each: 2 blocks left
    urgent = req("urgent", priority=0)
    out = make_scheduler(PriorityScheduler).schedule([low, mid, urgent], kv)
    assert ids(out.preempted) == ["low"]  # gives back 2 held + 1 reserved: 5 >= 3
    assert ids(out.fitting) == ["urgent", "mid"]


def test_preempts_the_newest_among_equally_unimportant_requests():
    kv = tiny_kv_cache(32)
    old, new = req("old", priority=4), req("new", priority=4)
    start(kv, old, new)
    urgent = req("urgent", priority=0)
    out = make_scheduler(PriorityScheduler).schedule([old, new, urgent], kv)
    assert ids(out.preempted) == ["new"]
    assert ids(out.fitting) == ["urgent", "old"]


def test_preempts_as_many_as_needed_least_important_first():
    kv = tiny_kv_cache(max_tokens=48)  # 12 blocks
    a, b, c, d = (req(x, priority=p) for x, p in (("a", 3), ("b", 5), ("c", 4), ("d", 5)))
    start(kv, a, b, c, d)  # 12 blocks held or reserved; 0 left
    huge = req("huge", prompt_len=20, max_tokens=4, priority=0)  # 23 tokens: 6 blocks
    out = make_scheduler(PriorityScheduler).schedule([a, b, c, d, huge], kv)
    assert ids(out.preempted) == ["d", "b"]  # priority 5 first, newest first: 3 + 3 = 6 blocks
    assert ids(out.fitting) == ["huge", "a", "c"]


def test_never_preempts_for_an_equally_or_less_important_request():
    kv = tiny_kv_cache(32)
    r1, r2 = req("r1", priority=2), req("r2", priority=2)
    start(kv, r1, r2)
    for p in (2, 3):
        out = make_scheduler(PriorityScheduler).schedule([r1, r2, req("q", priority=p)], kv)
        assert out.preempted == []
        assert ids(out.fitting) == ["r1", "r2"]


def test_preempts_nothing_when_even_all_candidates_would_not_make_room():
    kv = tiny_kv_cache(32)
    keep, low = req("keep", priority=0), req("low", priority=9)
    start(kv, keep, low)  # low gives back 3 blocks at most; 2 + 3 < 6
    too_big = req("too_big", prompt_len=20, max_tokens=4, priority=1)  # 6 blocks
    out = make_scheduler(PriorityScheduler).schedule([keep, low, too_big], kv)
    assert out.preempted == []
    assert ids(out.fitting) == ["keep", "low"]


def test_preempt_false_waits_instead():
    kv = tiny_kv_cache(32)
    low, mid = req("low", priority=5), req("mid", priority=1)
    start(kv, low, mid)
    out = make_scheduler(PriorityScheduler, PriorityConfig(preempt=False)).schedule([low, mid, req("urgent", priority=0)], kv)
    assert out.preempted == []
    assert ids(out.fitting) == ["mid", "low"]


def test_preempts_for_a_batch_slot_too():
    kv = tiny_kv_cache(max_tokens=128)  # plenty of blocks
    low, mid = req("low", priority=5), req("mid", priority=1)
    start(kv, low, mid)
    out = make_scheduler(PriorityScheduler, max_batch_size=2).schedule([low, mid, req("urgent", priority=0)], kv)
    assert ids(out.preempted) == ["low"]
    assert ids(out.fitting) == ["urgent", "mid"]


def test_blocks_shared_with_a_kept_request_do_not_count_as_released():
    kv = tiny_kv_cache(32)
    prompt = [7, 7, 7, 7, 8, 8, 8, 8]
    first, twin = req("first", prompt=prompt), req("twin", prompt=prompt, priority=9)
    start(kv, first)
    start(kv, twin)  # reuses first's first block (a prompt's last token is always computed)
    assert kv.num_exclusive_blocks(twin) == 1  # it holds 2 blocks, one of them shared
    assert kv.num_free_blocks == 5  # 8 - 2 (first) - 1 (twin's own); reserved: 1 + 1 -> 3 available
    urgent = req("urgent", prompt_len=20, max_tokens=4, priority=0)  # 23 tokens: 6 blocks
    # twin gives back 1 reserved + 1 exclusive block: 3 + 2 < 6, so preempting it would not help
    # (counting its shared block would wrongly say 6 >= 6); first is as important as the default.
    out = make_scheduler(PriorityScheduler).schedule([first, twin, urgent], kv)
    assert out.preempted == []
    assert ids(out.fitting) == ["first", "twin"]
    smaller = req("smaller", prompt_len=16, max_tokens=4, priority=0)  # 19 tokens: 5 blocks
    out = make_scheduler(PriorityScheduler).schedule([first, twin, smaller], kv)
    assert ids(out.preempted) == ["twin"]
    assert ids(out.fitting) == ["first", "smaller"]  # equal priority: arrival order


# ---- end to end, through the real executor (framework.testing's FakeEngine stands in for a model) ----


def test_end_to_end_an_urgent_late_arrival_preempts_and_finishes_first():
    kv = tiny_kv_cache(32)
    background = [req(f"bg{i}", prompt_len=6, max_tokens=6, priority=5) for i in range(3)]  # 3 blocks each
    urgent = req("urgent", prompt_len=6, max_tokens=6, priority=0)
    executor = make_executor(capacity=make_scheduler(PriorityScheduler), kv_cache=kv, max_num_tokens=16)
    trace = run_to_completion(executor, {0: background, 2: [urgent]})
    assert trace.preemptions == [(2, "bg1")]  # only two background requests fit; the newer one yields
    # bg0 keeps running and finishes first; the preempted bg1 is recomputed before bg2 (arrival order)
    assert trace.finished == ["bg0", "urgent", "bg1", "bg2"]
    assert next(r for r in background if r.request_id == "bg1").num_preemptions == 1
    assert kv.num_free_blocks == kv.get_max_resource_count()  # everything released


def test_end_to_end_without_preemption_the_urgent_request_waits_but_jumps_the_queue():
    background = [req(f"bg{i}", prompt_len=6, max_tokens=6, priority=5) for i in range(3)]
    urgent = req("urgent", prompt_len=6, max_tokens=6, priority=0)
    capacity = make_scheduler(PriorityScheduler, PriorityConfig(preempt=False))
    trace = run_to_completion(make_executor(capacity=capacity, kv_cache=tiny_kv_cache(32), max_num_tokens=16), {0: background, 2: [urgent]})
    assert trace.preemptions == []
    assert trace.finished.index("urgent") < trace.finished.index("bg2")  # admitted before the earlier bg2


# ---- registration and configuration -------------------------------------------------------------


def test_the_plugin_manager_exposes_priority_with_provider_and_config():
    plugins = create_plugin_manager(extra_plugins=[framework_priority], autoload=False)
    registry = plugins["capacity_scheduler"]
    assert "priority" in registry
    entry = registry.get("priority")
    assert entry.provider == "framework_priority"
    assert entry.config is PriorityConfig
    assert entry.factory == "framework_priority.scheduler:PriorityScheduler"
    assert entry.load() is PriorityScheduler
    assert "priority (framework_priority)" in registry.describe()
    assert "pkg://framework_priority.conf" in plugins.config_search_paths()
    row = next(r for r in plugins.describe() if r["distribution"] == "framework_priority")
    assert row["provides"] == {"capacity_scheduler": ["priority"]} and not row["builtin"]


def test_registration_does_not_import_torch():
    code = (
        "import sys, framework_priority;"
        "from framework.plugins.manager import create_plugin_manager;"
        "create_plugin_manager(extra_plugins=[framework_priority], autoload=False);"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = str(__import__("pathlib").Path(framework_priority.__file__).parents[1])
    # The built-in registration modules must be torch-free too, or this checks nothing useful.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.fixture
def plugins():
    return create_plugin_manager(extra_plugins=[framework_priority], autoload=False)


def test_hydra_selects_priority_by_name_with_typed_keys(plugins):
    from framework.config import component_config, compose

    cfg = compose(["scheduler=priority", "scheduler.default_priority=3"], plugins)
    assert cfg.scheduler.capacity == "priority" and cfg.scheduler.micro_batch == "fcfs"
    own = component_config(cfg.scheduler, plugins["capacity_scheduler"].get("priority").config)
    assert own == PriorityConfig(default_priority=3, preempt=True)
    # built the way framework.executor.builder builds a capacity scheduler
    scheduler = plugins["capacity_scheduler"].get("priority").load()(cfg.scheduler, own)
    assert isinstance(scheduler, PriorityScheduler) and scheduler.config.default_priority == 3
    with pytest.raises(Exception, match="preempt"):
        compose(["scheduler=priority", "scheduler.preempt=sometimes"], plugins)


def test_the_priority_preempt_preset_comes_through_the_search_path(plugins):
    from framework.config import compose

    cfg = compose(["scheduler=priority_preempt", "scheduler.max_batch_size=4"], plugins)
    assert (cfg.scheduler.capacity, cfg.scheduler.micro_batch) == ("priority", "fcfs")
    assert cfg.scheduler.preempt is True and cfg.scheduler.default_priority == 0
    assert cfg.scheduler.max_batch_size == 4
