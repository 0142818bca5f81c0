"""The open-file limit and the WebSocket cap derived from it (server/fds.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from server.fds import FD_RESERVE, raise_open_file_limit, socket_cap

ROOT = Path(__file__).resolve().parent.parent


def test_the_automatic_socket_cap_keeps_descriptors_back_from_the_open_file_limit() -> None:
    assert socket_cap(0, 1024) == 1024 - FD_RESERVE
    assert socket_cap(0, 300) == 150           # at least half of a small limit
    assert socket_cap(0, 1 << 20) == (1 << 20) - FD_RESERVE
    assert socket_cap(40, 1024) == 40           # a configured cap as it is


def _limits_in_child(soft: int) -> tuple[int, int]:
    """raise_open_file_limit() in a child process started with this soft limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = ("import json; from server.fds import raise_open_file_limit; "
            "print(json.dumps(raise_open_file_limit()))")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    before, after = json.loads(out.stdout)
    return before, after


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard open-file limit {hard}: nothing to raise")
    before, after = _limits_in_child(256)
    assert before == 256
    assert after == (hard if hard != resource.RLIM_INFINITY else 1 << 20)


def test_a_limit_that_cannot_be_raised_stays_and_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (512, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_file_limit() == (512, 512)
    assert "could not raise the open-file limit from 512 to 4096" in caplog.text
