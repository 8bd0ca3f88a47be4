"""Progress bars that the ``quick`` runner follows from its worker processes, and its status line.

:func:`bar` is a tqdm bar (silent without tqdm). Inside :func:`recording` (how a ``quick`` worker
runs a study) every bar also writes its study's state, ``{"started", "desc", "n", "total"}``, to
``<dir>/<study>.json`` as it moves; the runner reads those files back into :func:`status_line`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is an optional dependency
    tqdm = None

#: ``(file, start time)`` of the study being recorded in this process, if any
_recorded: Optional[Tuple[Path, float]] = None
_lock = threading.Lock()


def write_state(path: Path, state: dict) -> None:
    """Replace ``path`` by ``state`` at once (a reader never sees half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


def read_states(directory: Path) -> Dict[str, dict]:
    """Study name -> its latest state, for every file in ``directory`` that can be read."""
    states = {}
    for path in sorted(Path(directory).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            states[path.stem] = json.loads(path.read_text())
    return states


@contextlib.contextmanager
def recording(directory: Path, study: str) -> Iterator[None]:
    """Within: ``study`` counts as started now, and every :func:`bar` writes its state to ``directory``."""
    global _recorded
    _recorded = Path(directory) / f"{study}.json", time.time()
    write_state(_recorded[0], {"started": _recorded[1], "desc": study, "n": 0, "total": 0})
    try:
        yield
    finally:
        _recorded = None


class SilentBar:
    """What :func:`bar` gives without tqdm: every method does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RecordedBar:
    """A bar shown through ``inner`` that writes its study's state at every step (thread-safe:
    a pool's callback thread may update it)."""

    def __init__(self, inner, path: Path, started: float, desc: str, total: int):
        self._inner, self._path = inner, path
        self._state = {"started": started, "desc": desc, "n": 0, "total": total}
        self._advance(0)

    def update(self, n: int = 1) -> None:
        self._inner.update(n)
        self._advance(n)

    def close(self) -> None:
        self._inner.close()
        self._advance(0, closed=True)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _advance(self, n: int, closed: bool = False) -> None:
        with _lock:
            self._state["n"] = self._state["total"] if closed else self._state["n"] + n  # a closed bar is done
            write_state(self._path, self._state)


def bar(total: int, desc: str):
    """A tqdm progress bar (:class:`SilentBar` without tqdm) with ``update()``, ``set_postfix_str()``
    and ``close()``; inside :func:`recording` it also writes its study's state."""
    inner = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True) if tqdm is not None else SilentBar()
    return inner if _recorded is None else RecordedBar(inner, *_recorded, desc, total)


def seconds_left(running: Mapping[str, dict], finished: Mapping[str, float], waiting: Sequence[str], jobs: int,
                 typical: Mapping[str, float], now: float) -> Optional[float]:
    """The wall seconds left (``None`` before any progress): each study's ``typical`` seconds, scaled by
    the pace so far (seconds taken per typical second of the work done), shared among ``jobs`` workers."""
    typical = {name: typical.get(name, 60.0) for name in [*running, *finished, *waiting]}  # 60 s if not listed
    done = {name: min(state["n"] / state["total"], 1.0) if state["total"] else 0.0  # its latest bar's share
            for name, state in running.items()}
    taken = sum(finished.values()) + sum(now - running[name]["started"] for name, share in done.items() if share > 0)
    typical_done = sum(typical[name] for name in finished) + sum(share * typical[name] for name, share in done.items())
    if typical_done <= 0:
        return None
    pace = taken / typical_done
    running_left = [pace * typical[name] * (1 - share) for name, share in done.items()]
    all_left = sum(running_left) + sum(pace * typical[name] for name in waiting)
    return max(max(running_left, default=0.0), all_left / jobs)


def status_line(directory: Path, names: Sequence[str], finished: Mapping[str, float], elapsed: float, jobs: int,
                typical: Mapping[str, float], now: Optional[float] = None) -> str:
    """``[3:12] es large 41/120, gaussian 12/30, done: vi (102 s), 2 waiting | about 4 min left``: the
    studies ``names`` from their files in ``directory`` (``finished``: their seconds), ``elapsed`` seconds in."""
    states = read_states(directory)
    running = {name: state for name, state in states.items() if name not in finished}
    waiting = [name for name in names if name not in states and name not in finished]
    parts = [f"{state['desc']} {state['n']}/{state['total']}" if state["total"] else f"{name} starting"
             for name, state in running.items()]
    if finished:
        parts.append("done: " + ", ".join(f"{name} ({seconds:.0f} s)" for name, seconds in finished.items()))
    if waiting:
        parts.append(f"{len(waiting)} waiting")
    left = seconds_left(running, finished, waiting, jobs, typical, time.time() if now is None else now)
    minutes, seconds = divmod(int(elapsed), 60)
    line = f"[{minutes}:{seconds:02d}] " + ", ".join(parts)
    if left is None:
        return line
    return line + (" | under a minute left" if left < 60 else f" | about {math.ceil(left / 60)} min left")
