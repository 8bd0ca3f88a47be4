"""Progress bars that the ``quick`` runner follows from another process, and its status line.

:func:`bar` is a tqdm bar (a silent stand-in without tqdm). Inside :func:`recording` (what a
``quick`` worker runs each study in; it sets ``STRUCTNGD_PROGRESS_DIR`` and
``STRUCTNGD_PROGRESS_STUDY``), every bar also records its state (``desc``, ``n``, ``total``,
``elapsed``) in ``<dir>/<study>.json``, replaced atomically at most once a second and when the
bar closes; a study that opens several bars in sequence records them all, in order. The runner
reads those files (:func:`read_progress`) and prints :func:`status_line`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is an optional dependency
    tqdm = None

#: the environment variables that make bars record: the folder of the files, the study's name
DIR_VARIABLE = "STRUCTNGD_PROGRESS_DIR"
STUDY_VARIABLE = "STRUCTNGD_PROGRESS_STUDY"
#: the shortest time between two writes of one study's file while a bar moves
WRITE_EVERY_SECONDS = 1.0


# ------------------------------------------------------------ the records
@dataclass
class BarState:
    """One bar as recorded: ``n`` of ``total`` done after ``elapsed`` seconds."""

    desc: str
    n: int
    total: int
    elapsed: float = 0.0
    closed: bool = False

    @property
    def fraction(self) -> float:
        """The share done, in ``[0, 1]`` (a closed bar is done)."""
        if self.closed:
            return 1.0
        return min(self.n / self.total, 1.0) if self.total > 0 else 0.0


@dataclass
class StudyProgress:
    """A study's record: when it started (``time.time()``) and its bars so far, in order."""

    study: str
    started: float
    bars: List[BarState] = field(default_factory=list)

    @property
    def latest(self) -> Optional[BarState]:
        return self.bars[-1] if self.bars else None


def progress_file(directory: Path, study: str) -> Path:
    """Where ``study``'s record lives."""
    return Path(directory) / f"{study}.json"


def write_progress(directory: Path, record: StudyProgress) -> None:
    """Replace the study's file by ``record`` at once (a reader never sees half a file)."""
    path = progress_file(directory, record.study)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    temporary.write_text(json.dumps(asdict(record)))
    os.replace(temporary, path)


def read_progress(directory: Path) -> Dict[str, StudyProgress]:
    """Every study's record in ``directory`` (a file that cannot be read yet is left out)."""
    records = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            bars = [BarState(**bar) for bar in data["bars"]]
            records[data["study"]] = StudyProgress(data["study"], float(data["started"]), bars)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


# --------------------------------------------------------- the worker side
_records: Dict[Path, StudyProgress] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def recording(directory: Path, study: str) -> Iterator[None]:
    """Within: ``study`` is recorded in ``directory`` (started now, no bar yet), and every
    :func:`bar` adds itself to that record."""
    saved = {name: os.environ.get(name) for name in (DIR_VARIABLE, STUDY_VARIABLE)}
    os.environ[DIR_VARIABLE], os.environ[STUDY_VARIABLE] = str(directory), study
    record = StudyProgress(study, time.time())
    with _lock:
        _records[progress_file(directory, study)] = record
        write_progress(directory, record)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _current_record() -> Optional[tuple]:
    """``(directory, record)`` of the study the environment names, where this process entered its
    :func:`recording` (a study's own worker processes inherit the variables, not the record),
    else ``None``."""
    directory, study = os.environ.get(DIR_VARIABLE), os.environ.get(STUDY_VARIABLE)
    if not directory or not study:
        return None
    with _lock:
        record = _records.get(progress_file(directory, study))
    return None if record is None else (Path(directory), record)


class SilentBar:
    """The stand-in for a tqdm bar where tqdm is not installed: it shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RecordedBar:
    """A bar that shows through ``inner`` and records its state in its study's file
    (thread-safe: runs finishing in a pool's callback thread may update it)."""

    def __init__(self, inner, directory: Path, record: StudyProgress, total: int, desc: str):
        self._inner, self._directory, self._record = inner, directory, record
        self._state = BarState(desc, 0, total)
        self._start = time.monotonic()
        self._written = -math.inf
        with _lock:
            record.bars.append(self._state)
            self._write()

    def update(self, n: int = 1) -> None:
        self._inner.update(n)
        with _lock:
            self._state.n += n
            if time.monotonic() - self._written >= WRITE_EVERY_SECONDS:
                self._write()

    def set_postfix_str(self, text: str) -> None:
        self._inner.set_postfix_str(text)

    def close(self) -> None:
        self._inner.close()
        with _lock:
            self._state.closed = True
            self._write()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _write(self) -> None:
        """Write the study's record now (the caller holds the lock)."""
        self._state.elapsed = time.monotonic() - self._start
        self._written = time.monotonic()
        write_progress(self._directory, self._record)


def bar(total: int, desc: str):
    """A tqdm progress bar (:class:`SilentBar` without tqdm) with ``update()``,
    ``set_postfix_str()`` and ``close()``; recorded inside :func:`recording`."""
    inner = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True) if tqdm is not None else SilentBar()
    current = _current_record()
    return inner if current is None else RecordedBar(inner, *current, total, desc)


# ---------------------------------------------------------- the runner side
@dataclass
class Snapshot:
    """What the runner knows at one moment: ``elapsed`` seconds since it started, the records of
    the studies that started, the seconds of those that finished, the studies still waiting, and
    ``jobs`` studies at a time."""

    elapsed: float
    records: Mapping[str, StudyProgress]
    finished: Mapping[str, float]
    waiting: Sequence[str]
    jobs: int
    now: float = field(default_factory=time.time)


def study_fraction(record: StudyProgress, shares: Optional[Mapping[str, float]] = None) -> float:
    """The share of ``record``'s study that is done: its bars weighted by ``shares`` (bar desc ->
    typical share of the study's time) where given, else the mean of the bars seen so far."""
    if not record.bars:
        return 0.0
    if shares:
        return min(sum(shares.get(b.desc, 0.0) * b.fraction for b in record.bars) / sum(shares.values()), 1.0)
    return sum(b.fraction for b in record.bars) / len(record.bars)


def _pace(snapshot: Snapshot, typical: Mapping[str, float], fractions: Mapping[str, float]) -> Optional[float]:
    """Observed seconds per typical second, over the finished studies and the running ones'
    done shares; ``None`` before anything was observed."""
    seconds = sum(snapshot.finished.values())
    expected = sum(typical[name] for name in snapshot.finished)
    for name, fraction in fractions.items():
        if fraction > 0:
            seconds += snapshot.now - snapshot.records[name].started
            expected += fraction * typical[name]
    return seconds / expected if expected > 0 else None


def _study_seconds_left(elapsed: float, fraction: float, expected_total: float) -> float:
    """A running study's seconds left: its own pace (``elapsed / fraction``) weighted by how
    much of it is done, the expected total for the rest."""
    own = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
    expected = max(expected_total - elapsed, 0.0)
    return fraction * own + (1 - fraction) * expected


def _wall_left(running: Sequence[float], waiting: Sequence[float], jobs: int) -> float:
    """The wall time left when the running studies end after ``running`` seconds and each waiting
    one goes, in order, to the first free of ``jobs`` workers."""
    workers = sorted(running) + [0.0] * max(jobs - len(running), 0)
    for seconds in waiting:
        workers.sort()
        workers[0] += seconds
    return max(workers, default=0.0)


def seconds_left(snapshot: Snapshot, typical: Mapping[str, float],
                 shares: Mapping[str, Mapping[str, float]]) -> Optional[float]:
    """The estimated wall seconds left (``None`` until some progress was seen): each study's
    ``typical`` seconds scaled by the observed pace, running ones by their own share done."""
    names = list(snapshot.records) + list(snapshot.finished) + list(snapshot.waiting)
    default = sum(typical.values()) / len(typical) if typical else 60.0
    typical = {name: typical.get(name, default) for name in names}
    running = [name for name in snapshot.records if name not in snapshot.finished]
    fractions = {name: study_fraction(snapshot.records[name], shares.get(name)) for name in running}
    pace = _pace(snapshot, typical, fractions)
    if pace is None:
        return None
    running_left = [_study_seconds_left(snapshot.now - snapshot.records[name].started, fractions[name],
                                        pace * typical[name]) for name in running]
    return _wall_left(running_left, [pace * typical[name] for name in snapshot.waiting], snapshot.jobs)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def _running_text(name: str, record: StudyProgress) -> str:
    """``es bbob 41/120`` (the latest bar), or ``dl starting`` before the first."""
    latest = record.latest
    if latest is None:
        return f"{name} starting"
    label = latest.desc if latest.desc.startswith(name) else f"{name} {latest.desc}"
    return f"{label} {latest.n}/{latest.total}"


def _left_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return " | under a minute left"
    return f" | about {math.ceil(seconds / 60)} min left"


def status_line(snapshot: Snapshot, typical: Mapping[str, float],
                shares: Mapping[str, Mapping[str, float]]) -> str:
    """``[3:12] es bbob 41/120, gaussian 12/30, done: vi (102 s), 2 waiting | about 4 min left``."""
    parts = [_running_text(name, record) for name, record in snapshot.records.items()
             if name not in snapshot.finished]
    if snapshot.finished:
        parts.append("done: " + ", ".join(f"{name} ({seconds:.0f} s)" for name, seconds in snapshot.finished.items()))
    if snapshot.waiting:
        parts.append(f"{len(snapshot.waiting)} waiting")
    left = _left_text(seconds_left(snapshot, typical, shares))
    return f"[{_clock(snapshot.elapsed)}] " + ", ".join(parts) + left
