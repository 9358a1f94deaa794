"""A progress bar on stderr for long CLI work (management commands, benchmarks): a redrawn bar on a
terminal, a line every 10 % otherwise (logs, CI)."""

import sys
import time


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, label: str, total: int, unit: str = ""):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.tty = sys.stderr.isatty()
        self.done = 0
        self.last_decile = -1
        self.started = time.monotonic()
        self._draw()

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        self._draw()

    def advance(self, step: int = 1) -> None:
        self.update(self.done + step)

    def _draw(self) -> None:
        fraction = self.done / self.total
        if self.tty:
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r  {self.label:<44} [{bar:<30}] {self.done}/{self.total}{self.unit}")
            sys.stderr.flush()
        elif int(fraction * 10) > self.last_decile:
            self.last_decile = int(fraction * 10)
            say(f"  {self.label}: {self.done}/{self.total}{self.unit}")

    def close(self, note: str = "") -> float:
        elapsed = time.monotonic() - self.started
        if self.tty:
            sys.stderr.write("\n")
        say(f"  {self.label}: done in {elapsed:.1f} s{(' - ' + note) if note else ''}")
        return elapsed
