"""Progress display for long work: a tqdm bar on a terminal, a plain line every few seconds in a log file.

tqdm redraws its bar with carriage returns; written to a file or a pipe that becomes thousands of ``\\r`` updates on
one "line". :func:`progress_bar` returns a real ``tqdm`` bar either way, so callers use ``update``/``set_postfix``/
``close`` as usual; when the stream is not a TTY the bar prints one complete line (``desc: n/total unit, rate,
postfix``) at most every ``interval_s`` seconds, and a last one when it closes.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 5.0


class _LineProgress(tqdm):
    """tqdm that prints plain, newline-terminated lines at most every ``interval_s`` seconds."""

    def __init__(self, *args, interval_s: float = LOG_INTERVAL_S, **kwargs):
        self._interval_s, self._last_line, self._last_n = interval_s, float("-inf"), None
        kwargs.setdefault("file", sys.stderr)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # called by tqdm on refresh; replaces the in-place redraw
        now = time.monotonic()
        if msg == "" or self.n == self._last_n:  # tqdm's clear on close, or nothing new
            return True
        if now - self._last_line < self._interval_s and not self._closing():
            return True
        self._last_line, self._last_n = now, self.n
        d = self.format_dict
        total = f"/{d['total']}" if d.get("total") else ""
        rate = f", {d['rate']:.1f} {d['unit']}/s" if d.get("rate") else ""
        post = f", {d['postfix']}" if d.get("postfix") else ""
        self.fp.write(f"{d.get('prefix') or 'progress'}: {d['n']}{total} {d['unit']}{rate}{post}\n")
        self.fp.flush()
        return True

    def close(self):
        if not self.disable:
            self.display()  # the last line; then skip tqdm's terminal clean-up ("\r")
            self.disable = True
            self._decr_instances(self)

    def _closing(self) -> bool:
        return bool(self.disable) or (self.total is not None and self.n >= self.total)


def progress_bar(*, total: int | None, desc: str, unit: str = "it", disable: bool = False,
                 interval_s: float = LOG_INTERVAL_S, file=None) -> tqdm:
    """A progress bar over ``total`` units. On a TTY a normal tqdm bar; otherwise plain lines every ``interval_s``
    seconds (see the module docstring). ``disable=True`` prints nothing."""
    stream = file if file is not None else sys.stderr
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=stream)
    return _LineProgress(total=total, desc=desc, unit=unit, file=stream, interval_s=interval_s, mininterval=0,
                         leave=False)
