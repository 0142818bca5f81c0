"""The text-flood benchmark sends what a server with the default limits accepts, and reads the
gauge the server exports: otherwise it would measure an error reply, not the flood."""

from prometheus_client import generate_latest

from benchmarks.text_flood import _LAG_MAX, _scenarios
from server.config import load_config
from server.metrics import Metrics


def test_every_scenario_is_within_the_default_limits():
    limits = load_config(None, {}).limits
    for name, frames in _scenarios().items():
        assert sum(map(len, frames)) <= limits.max_text_chars, name
        assert max(len(f.encode()) for f in frames) < limits.max_frame_bytes, name
    assert len(_scenarios()["small-frames"]) == 20_000


def test_it_reads_the_servers_worst_loop_lag_gauge():
    metrics = Metrics()
    metrics.loop_lag_max_seconds.set(0.034)
    m = _LAG_MAX.search(generate_latest(metrics.registry).decode())
    assert m is not None and float(m.group(1)) == 0.034
