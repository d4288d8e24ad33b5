"""A terminal progress board for ``lethe submit`` / ``watch`` / ``demo``: one bar per request.

On a TTY the block of bars is redrawn in place (ANSI cursor-up), at most ``refresh_s`` apart; otherwise
(CI logs, pipes) one line is printed per change of stage or state, so logs stay readable. No third-party
dependency: a few ANSI escapes are all it takes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

BAR_WIDTH = 24


@dataclass
class _Row:
    label: str
    status: str = "sent"
    stage: str = ""
    fraction: float = 0.0
    done: bool = False


class ProgressBoard:
    def __init__(self, stream: TextIO | None = None, refresh_s: float = 0.1, interactive: bool | None = None):
        self._stream = stream or sys.stderr
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._rows: dict[str, _Row] = {}
        self._drawn_lines = 0
        self._last_draw = 0.0
        self._refresh_s = refresh_s

    def add(self, key: str, label: str | None = None) -> None:
        self._rows.setdefault(key, _Row(label or key))
        self._draw(force=True)

    def update(self, keys: str | Sequence[str], *, status: str | None = None, stage: str | None = None,
               fraction: float | None = None, done: bool = False) -> None:
        """Update one row, or several that share a job (one log line for all of them off a TTY)."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        changed = []
        for key in keys:
            row = self._rows.setdefault(key, _Row(key))
            before = (row.status, row.stage, row.done)
            if status is not None:
                row.status = status
            if stage is not None:
                row.stage = stage
            if fraction is not None:
                row.fraction = min(max(fraction, 0.0), 1.0)
            row.done = row.done or done
            if (row.status, row.stage, row.done) != before:
                changed.append(row)
        if self._interactive:
            self._draw(force=done)
        elif changed:
            label = changed[0].label if len(changed) == 1 else f"{changed[0].label} (+{len(changed) - 1} more)"
            self._stream.write(f"{self._line(changed[0], label)}\n")
            self._stream.flush()

    def close(self) -> None:
        if self._interactive:
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self._interactive:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self._refresh_s:
            return
        self._last_draw = now
        out = [f"\x1b[{self._drawn_lines}A"] if self._drawn_lines else []
        out += [f"\x1b[2K{self._line(row)}\n" for row in self._rows.values()]
        self._stream.write("".join(out))
        self._stream.flush()
        self._drawn_lines = len(self._rows)

    def _line(self, row: _Row, label: str | None = None) -> str:
        filled = int(round(row.fraction * BAR_WIDTH))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        width = max((len(r.label) for r in self._rows.values()), default=10)
        return f"{label or row.label:<{width}} [{bar}] {row.fraction * 100:5.1f}%  {row.status:<30} {row.stage}"
