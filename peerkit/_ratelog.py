"""Log lines that cannot be flooded (sans-IO, internal).

Whatever another program can cause many times a second (undecodable messages, malformed
frames) is reported through a :class:`RateLog`: the first event of a kind is reported at once,
later ones within ``interval`` seconds are held back and counted, and the next report says how
many there were. The counters that matter (``decode_errors``, ...) stay exact; only the log
lines are thinned out.

The limiter reads its clock only when an event happens, so the paths where nothing goes
wrong never read it::

    limiter = RateLog(10.0, trio.current_time)
    ...
    report = limiter.hit(("decode", msg_type), errors)
    if report is not None:
        log.error("dropped %d undecodable messages%s", report.count, report.more())
    # -> "dropped 1024 undecodable messages (and 3072 more since the last report, 10 s
    #    ago, not logged one by one)"
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import attrs

__all__ = ["DEFAULT_INTERVAL", "OTHERS", "RateLog", "Report"]

#: Seconds between two reports of one kind of event (peer and broker logs).
DEFAULT_INTERVAL = 10.0

#: The key that events of new keys are counted under once :attr:`RateLog.max_keys` keys are
#: held: memory stays bounded however many keys an attacker invents.
OTHERS = "(others)"


@attrs.frozen
class Report:
    """What to log: the ``count`` events of the call that made the report, and ``held``
    events of the same key held back since its previous report (made ``since`` seconds ago;
    None for the first report of the key)."""

    count: int
    held: int = 0
    since: float | None = None
    #: the key the events were counted under (:data:`OTHERS` when the limiter was full)
    key: Hashable = None

    @property
    def total(self) -> int:
        """Every event this report accounts for."""
        return self.count + self.held

    def more(self) -> str:
        """A suffix for the log line: ``" (and 41 more since the last report, 10 s ago, not
        logged one by one)"``, or ``""`` when nothing was held back."""
        if not self.held:
            return ""
        when = f", {self.since:.0f} s ago" if self.since is not None else ""
        return f" (and {self.held} more since the last report{when}, not logged one by one)"


@attrs.define
class _Entry:
    last: float  # when the key was last reported
    held: int = 0  # events held back since


@attrs.define
class RateLog:
    """A per-key limiter: at most one report per key every ``interval`` seconds (see the
    module docstring). ``clock()`` returns the time in seconds (``trio.current_time``,
    ``time.monotonic``, or a test's own)."""

    interval: float
    clock: Callable[[], float]
    #: keys held at once; events of further keys count under :data:`OTHERS`
    max_keys: int = 256
    _keys: dict[Hashable, _Entry] = attrs.field(factory=dict, init=False)

    def hit(self, key: Hashable, count: int = 1) -> Report | None:
        """Count ``count`` events of ``key``. Returns the :class:`Report` to log now (these
        events and those held back since the last report), or None to stay quiet (they are
        held back until the next report of the key, or :meth:`drain`)."""
        now = self.clock()
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.max_keys:
                self._prune(now)
            if len(self._keys) >= self.max_keys and key != OTHERS:
                return self.hit(OTHERS, count)
            self._keys[key] = _Entry(now)
            return Report(count, key=key)
        since = now - entry.last
        if since < self.interval:
            entry.held += count
            return None
        held, entry.held, entry.last = entry.held, 0, now
        return Report(count, held, since, key)

    def drain(self) -> list[Report]:
        """Reports (``count`` 0) of the events still held back, for a last word at
        shutdown; forgets every key."""
        now = self.clock()
        reports = [Report(0, e.held, now - e.last, key) for key, e in self._keys.items() if e.held]
        self._keys.clear()
        return reports

    def _prune(self, now: float) -> None:
        """Forget the keys with nothing held back whose interval is over (their next event
        is reported at once anyway)."""
        keys = self._keys
        for key in [k for k, e in keys.items() if not e.held and now - e.last >= self.interval]:
            del keys[key]
