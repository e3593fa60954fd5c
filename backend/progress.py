"""A dependency-free progress line with rate and ETA (works inside Blender, on farms, in pipes)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", stream=None, enabled: bool = True,
                 min_interval: float = 0.5):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        # Pipes and farm logs get a line every 10 s instead of a redrawn bar.
        self.min_interval = min_interval if self.tty else 10.0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, k: int = 1):
        self.n += k
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.min_interval or self.n >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float):
        dt = max(now - self.start, 1e-9)
        rate = self.n / dt
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        line = f"{self.desc} {self.n}/{self.total} ({pct:5.1f}%) {rate:6.2f}/s ETA {eta_s}"
        if self.tty:
            self.stream.write("\r" + line)
            if self.n >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty and self.n < self.total:
            self.stream.write("\n")
            self.stream.flush()
