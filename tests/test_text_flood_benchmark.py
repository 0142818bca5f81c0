"""The text-flood benchmark sends what a server with the default limits accepts, and reads the
gauge the server exports: otherwise it would measure an error reply, not the flood."""

from prometheus_client import generate_latest

import msgpack

from benchmarks.text_flood import _LAG_MAX, CONTAINER_FRAME, _scenarios
from server.config import load_config
from server.metrics import Metrics


def test_every_scenario_is_within_the_default_limits():
    limits = load_config(None, {}).limits
    for name, frames in _scenarios().items():
        texts = [f for f in frames if isinstance(f, str)]
        assert sum(map(len, texts)) <= limits.max_text_chars, name
        sizes = [len(f) if isinstance(f, bytes) else len(f.encode()) for f in frames]
        assert max(sizes) <= limits.max_frame_bytes, name
    assert len(_scenarios()["small-frames"]) == 20_000


def test_the_container_frame_is_a_cancel_of_a_million_empty_arrays():
    msg = msgpack.unpackb(CONTAINER_FRAME)
    assert (msg["type"], msg["ctx"], len(msg["x"]), msg["x"][0]) == ("cancel", "other", 1048512, [])


def test_it_reads_the_servers_worst_loop_lag_gauge():
    metrics = Metrics()
    metrics.loop_lag_max_seconds.set(0.034)
    m = _LAG_MAX.search(generate_latest(metrics.registry).decode())
    assert m is not None and float(m.group(1)) == 0.034
