"""When each stream next needs the scheduler: one armed time per stream, kept in a heap.

The scheduler's timers (a text deadline, a listener about to run dry, silence due, a stream
ready for its next chunk) used to be found by visiting every stream at every check, ~2 ms per
check at 1000 streams and the largest part of the event loop's own work. Each stream now has
at most one armed time, the earliest moment anything may fall due for it, and a check visits
only the streams whose time has come.

Re-arming a stream keeps whichever time is earlier: a visit before anything is due does nothing
(the scheduler's checks are idempotent), so an early time costs one visit, while a late one
would let a listener run dry. Superseded entries stay in the heap until they come up (lazy
deletion) and are skipped then; the heap is rebuilt when they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import itertools


class StreamTimers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []   # (when, tie-break, stream id)
        self._armed: dict[str, float] = {}              # stream id -> its live entry's time
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._armed)

    def armed_at(self, sid: str) -> float | None:
        return self._armed.get(sid)

    def arm(self, sid: str, when: float) -> None:
        """Have `sid` come up at `when`, or earlier if it is already armed for earlier."""
        current = self._armed.get(sid)
        if current is not None and current <= when:
            return
        self._armed[sid] = when
        heapq.heappush(self._heap, (when, next(self._seq), sid))
        if len(self._heap) > 4 * len(self._armed) + 64:
            self._rebuild()

    def discard(self, sid: str) -> None:
        self._armed.pop(sid, None)

    def pop_due(self, now: float) -> list[str]:
        """The streams whose time is `now` or earlier, disarmed, earliest first."""
        due = []
        heap, armed = self._heap, self._armed
        while heap and heap[0][0] <= now:
            when, _, sid = heapq.heappop(heap)
            if armed.get(sid) == when:
                del armed[sid]
                due.append(sid)
        return due

    def next_at(self) -> float | None:
        """The earliest armed time (None: nothing armed)."""
        heap, armed = self._heap, self._armed
        while heap and armed.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)   # superseded or discarded
        return heap[0][0] if heap else None

    def _rebuild(self) -> None:
        self._heap = [(when, next(self._seq), sid) for sid, when in self._armed.items()]
        heapq.heapify(self._heap)
