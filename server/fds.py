"""Open file descriptors: every WebSocket holds one, and the process has a limit.

Linux starts most processes with a soft limit of 1024 open files (a systemd service, a login
shell) although the hard limit allows far more: a server meant to hold a thousand streams would
run out near a thousand sockets. Past the limit the kernel still completes the TCP handshake,
the event loop cannot accept it and drops the connection: the client sees the server disconnect
with no reason, /healthz and /metrics stop answering, and nothing is logged.

So `run_server.py` raises the soft limit to the hard one at start, and the server refuses
WebSockets past `limits.max_sockets` (by default the limit less `FD_RESERVE`) with HTTP 503
before the upgrade, while descriptors remain for that answer, for /healthz and /metrics, and
for the model (a CUDA context opens dozens).
"""

from __future__ import annotations

import logging
import resource
from typing import Final

log = logging.getLogger(__name__)

# Descriptors kept back from WebSockets when `limits.max_sockets` is 0 (automatic): the
# process's own files, the model's (CUDA, NVML), and HTTP requests answered while the sockets
# are full. At most half of the limit.
FD_RESERVE: Final = 256
# A hard limit of "unlimited" is not raised to literally; this is plenty (Linux's nr_open).
_UNLIMITED_TARGET: Final = 1 << 20


def open_file_limit() -> int:
    """The soft limit on open files (what the process can actually open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _UNLIMITED_TARGET
    return soft


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard limit; returns (before, after). A limit the
    kernel refuses (a hard limit above the system's nr_open) leaves the soft one as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = open_file_limit()
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s",
                        before, target, exc)
    return before, open_file_limit()


def socket_cap(configured: int, fd_limit: int) -> int:
    """WebSockets the server holds at most: `configured` when set (> 0), else the open-file
    limit less the reserve (at least half of the limit)."""
    if configured > 0:
        return configured
    return max(fd_limit - FD_RESERVE, fd_limit // 2, 1)
