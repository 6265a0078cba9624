"""`mode=replay` against a URL: this project's own server on a loopback port, driven by the replay's
streaming client."""

import json

import pytest

from framework.config import compose
from framework.plugins.manager import create_plugin_manager
from framework.replay.http_client import Endpoint, completion_body, replay_url
from framework.replay.runner import run_replay
from framework.replay.workload import ReplayRequest
from tests.conftest import TINY_VOCAB
from tests.server.test_openai_server import MODEL, served  # noqa: F401 (served: the tiny model's server, a fixture)


def test_streamed_requests_are_timed_by_their_chunks(served):
    requests = [ReplayRequest(0.05 * i, list(range(100 + i, 108 + i)), 5, tenant="ab"[i % 2], priority=i % 2 or None) for i in range(4)]
    result = replay_url(served.url + "/v1", None, requests, progress=False)
    assert [(t.tenant, t.priority) for t in result.timings] == [("a", None), ("b", 1), ("a", None), ("b", 1)]
    assert json.loads(completion_body("m", requests[1]))["tenant"] == "b" and "priority" not in json.loads(completion_body("m", requests[0]))
    for timing in result.timings:
        assert timing.error is None and timing.output_tokens == 5
        assert timing.arrival < timing.token_times[0] <= timing.token_times[-1] <= timing.finish
        assert timing.ttft > 0
    assert result.duration >= max(t.finish for t in result.timings)


def test_a_refused_request_counts_as_failed(served):
    bad = ReplayRequest(0.0, [TINY_VOCAB + 5], 3)  # a token id beyond the vocabulary: 400
    good = ReplayRequest(0.0, [5, 6, 7], 3)
    bad_timing, good_timing = replay_url(served.url, MODEL, [bad, good], progress=False).timings
    assert bad_timing.error.startswith("HTTP 400") and not bad_timing.completed
    assert good_timing.completed


def test_the_endpoint_names_what_it_needs():
    with pytest.raises(ValueError, match="replay.url must look like http://host:port"):
        Endpoint("127.0.0.1:8000")
    assert Endpoint("http://h:1/v1/").base == "" and Endpoint("http://h:1/proxy/v1").base == "/proxy"


def test_mode_replay_with_a_url(served, tiny_dir, tmp_path, capsys):
    plugins = create_plugin_manager(autoload=False)
    overrides = [f"replay.url={served.url}", "replay.num_requests=5", "replay.rate=20", "replay.input.value=10", "replay.output.value=4", f"replay.vocab_size={TINY_VOCAB}", "replay.progress=false"]
    cfg = compose(["mode=replay", f"model.path={tiny_dir}", *overrides], plugins)
    run_replay(cfg, plugins, tmp_path, overrides)
    document = json.loads((tmp_path / "replay.json").read_text())
    assert document["setup"]["target"] == served.url
    assert (document["statistics"]["completed"], document["statistics"]["output_tokens"]) == (5, 20)
    assert "5 completed, 0 failed" in capsys.readouterr().out
