"""What a person sees while a study runs: live bars on a terminal, plain timestamped lines otherwise.

Ray tasks report epochs to a small `ProgressBoard` actor; the driver polls it and advances the bars.
The display never blocks the work: a lost report only makes a bar lag.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n noun` with the noun in the plural unless n is 1: "1 population", "3 populations"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


class ProgressBoard:
    """Ray actor body: populations report (population, epochs done) and their phase (loading data, compiling,
    training); the driver reads them."""

    def __init__(self) -> None:
        self.epochs: dict[str, int] = {}
        self.phases: dict[str, str] = {}

    def report(self, population: str, epochs_done: int) -> None:
        self.epochs[population] = epochs_done

    def phase(self, population: str, what: str) -> None:
        self.phases[population] = what

    def snapshot(self) -> dict[str, int]:
        return dict(self.epochs)

    def current_phases(self) -> dict[str, str]:
        return dict(self.phases)


class Display:
    """Bars for the study's phases (populations, model-epochs, analysis items), or plain lines: at most one every
    `every_s` (an update held back is printed when that time is up) and, while nothing changes, one every
    `quiet_s` so that a log shows the run is alive."""

    def __init__(self, console: Console | None = None, plain: bool | None = None, every_s: float = 5.0,
                 quiet_s: float = 30.0):
        self.console = console or Console(stderr=True)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.every_s, self.quiet_s = every_s, quiet_s
        self._held = False  # an update not printed yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bars: dict[str, TaskID] = {}
        self._state: dict[str, list[float]] = {}  # name -> [done, total]
        self._notes: dict[str, str] = {}  # name -> what is happening (plain lines show it in brackets)
        self._last_line = 0.0
        self._t0 = time.perf_counter()
        self._progress = None if self.plain else Progress(
            TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )

    def __enter__(self) -> "Display":
        if self._progress is not None:
            self._progress.start()
        else:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="symzoo-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        else:
            self._stop.set()
            if self._ticker is not None:
                self._ticker.join()
            if self._held:  # the last state, unless its line is out already
                self._print_lines(force=True)

    def _tick(self) -> None:
        """Plain lines: a held-back update once `every_s` is up, and the state every `quiet_s` while nothing moves."""
        while not self._stop.wait(min(1.0, self.every_s)):
            since = time.perf_counter() - self._last_line
            if (self._held and since >= self.every_s) or since >= self.quiet_s:
                self._print_lines(force=True)

    def add(self, name: str, total: float, note: str = "") -> None:
        self._state[name] = [0.0, float(total)]
        if self._progress is not None:
            self._bars[name] = self._progress.add_task(name, total=total, note=note)
        else:
            self.log(f"{name}: 0/{total:g} {note}")

    def update(self, name: str, done: float, note: str | None = None) -> None:
        if name not in self._state:
            return
        self._state[name][0] = done
        if note is not None:
            self._notes[name] = note
        if self._progress is not None:
            kw = {"note": note} if note is not None else {}
            self._progress.update(self._bars[name], completed=done, **kw)
        else:
            self._print_lines()

    def advance(self, name: str, by: float = 1, note: str | None = None) -> None:
        if name in self._state:
            self.update(name, self._state[name][0] + by, note)

    def log(self, message: str) -> None:
        """A line above the bars (or a plain timestamped line)."""
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)
        else:
            print(f"[{time.perf_counter() - self._t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def _print_lines(self, force: bool = False) -> None:
        with self._lock:
            now = time.perf_counter()
            if not force and now - self._last_line < self.every_s:
                self._held = True
                return
            self._last_line, self._held = now, False
            parts = [f"{name} {done:g}/{total:g}" + (f" ({self._notes[name]})" if self._notes.get(name) else "")
                     for name, (done, total) in list(self._state.items())]
        if parts:
            self.log(" | ".join(parts))
