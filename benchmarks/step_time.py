"""Speed and memory of structured natural-gradient steps, as ratios to Adam measured in the same run.

Three measurements, all in one process (so that every ratio compares timings taken under the
same machine load; no absolute time is ever asserted):

1. Time per ``NaturalGradient.step()`` on a ``Gaussian(d, structure)`` against
   ``torch.optim.Adam.step()`` on the *same* two parameters (``loc`` and ``factor``, with the same
   fixed ``.grad``), and against Adam on a *dense* problem (``loc`` plus a ``d x d`` matrix: what
   a user would otherwise optimize to get a full covariance). The three optimizers are sampled
   round-robin, so load changes hit all of them alike. Parameters are restored between samples
   (outside the timed region), so every sample times the same kind of steps.
2. Memory: floats held by the parameters and the optimizer state (``NaturalGradient`` with
   ``momentum=0`` keeps no state, with ``momentum>0`` one buffer per parameter; Adam keeps
   ``exp_avg`` and ``exp_avg_sq``), counted from the optimizers' real ``state`` after a step.
3. Scaling of ``group.matvec`` and ``group.solve`` on a batch of vectors as ``d`` doubles: about 2x
   for the O(d k) groups, 4x (matvec) to 8x (solve, an LU factorization per call) for ``dense``;
   plus the operation count ``group.numel()`` against ``d^2``.

Run ``python -m benchmarks.step_time`` (about 7 minutes on 2 CPU cores, plus up to 3 minutes waiting for a quiet machine) or
``python -m benchmarks.step_time --quick`` (d = 100, 1000; fewer repeats).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from structngd import groups as sgroups
from structngd.families import Gaussian
from structngd.optim import NaturalGradient

try:  # progress bar if available
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - fallback without tqdm
    tqdm = None

STRUCTURES = tuple(sgroups.GROUPS)  # every registered structure
SCALING_STRUCTURES = ("dense", "lower_triangular", "block_triangular", "heisenberg", "hierarchical")
DTYPE = torch.float32


# --------------------------------------------------------------------------- helpers
def structure_options(name: str, d: int, k: int) -> Dict[str, int]:
    """Group options used for structure ``name`` at dimension ``d`` with rank/block parameter ``k``."""
    if name == "block_diagonal":
        return {"block_size": max(b for b in range(1, k + 1) if d % b == 0)}
    if name == "block_triangular":
        return {"k": k}
    if name == "heisenberg":
        return {"k": k, "k2": k}
    if name == "hierarchical":
        return {"k1": k, "k2": k}
    return {}


def label(name: str, options: Dict[str, int]) -> str:
    if not options:
        return name
    return f"{name}({', '.join(f'{key}={value}' for key, value in options.items())})"


def state_floats(opt: torch.optim.Optimizer) -> int:
    """Number of scalars held in an optimizer's per-parameter state."""
    return sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


class CpuMonitor:
    """CPU time used by *other* processes while a measurement runs (Linux ``/proc/stat``).

    Other processes on a machine with few cores stall torch's worker threads and inflate
    timings by large factors; each task records how many cores others used meanwhile, and a
    task measured under load is redone once the machine is quiet (``--busy``).
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = self._busy() is not None

    def _busy(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        v = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.tick

    def snapshot(self):
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system

    def others(self, start, end) -> float:
        """Average number of cores used by other processes between two snapshots (nan if unknown)."""
        if start[1] is None or end[1] is None or end[0] <= start[0]:
            return float("nan")
        other = (end[1] - start[1]) - (end[2] - start[2])
        return max(0.0, other / (end[0] - start[0]))

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Sleep until others use less than ``threshold`` cores for 2 s in a row; returns seconds waited."""
        if not self.available:
            return 0.0
        begin, quiet = time.perf_counter(), 0
        while time.perf_counter() - begin < max_wait:
            a = self.snapshot()
            time.sleep(1.0)
            quiet = quiet + 1 if self.others(a, self.snapshot()) < threshold else 0
            if quiet >= 2:
                break
        return time.perf_counter() - begin


class Progress:
    """A tqdm bar when tqdm is installed, otherwise one line per task on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.count, self.total = 0, total
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True) if (tqdm and enabled) else None

    def start(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"[{self.count + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Timed:
    """A callable to time, how to reset before a sample, and the calibrated calls per sample."""

    fn: Callable[[], None]
    reset: Callable[[], None] = lambda: None
    calls: int = 1
    samples: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _run_sample(t: Timed) -> float:
    t.reset()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(t.calls):
            t.fn()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / t.calls


def measure_round_robin(
    timed: Sequence[Timed],
    repeats: int,
    target_s: float,
    max_calls: int,
    slow_s: float,
    slow_repeats: int,
) -> None:
    """Warm up and calibrate each callable, then take ``repeats`` samples of each, interleaved.

    A sample runs the callable ``calls`` times (so one sample lasts about ``target_s``); its time
    per call is recorded. When any callable takes more than ``slow_s`` per call, only
    ``slow_repeats`` rounds are taken.
    """
    per_call = []
    for t in timed:
        t.calls = 1
        one = _run_sample(t)  # warm-up: allocations, first-call dispatch
        if one < slow_s:  # a slow call needs no second warm-up; its time calibrates well enough
            one = _run_sample(t)  # calibration
        per_call.append(one)
        t.calls = int(min(max_calls, max(1, round(target_s / max(one, 1e-9)))))
    rounds = slow_repeats if max(per_call) > slow_s else repeats
    for _ in range(rounds):
        for t in timed:
            t.samples.append(_run_sample(t))


def measure_with_args(timed: List["Timed"], args: argparse.Namespace) -> None:
    """:func:`measure_round_robin` with the repeat and timing options from the command line."""
    measure_round_robin(
        timed,
        repeats=args.repeats,
        target_s=args.target,
        max_calls=args.max_calls,
        slow_s=args.slow,
        slow_repeats=args.slow_repeats,
    )


# --------------------------------------------------------------------------- part 1 + 2
@dataclass
class StepRow:
    structure: str
    d: int
    ngd: float
    adam: float
    adam_dense: float
    factor_numel: int
    loc_numel: int
    ngd_state_m0: int
    ngd_state_m: int
    adam_state: int
    adam_dense_params: int
    adam_dense_state: int
    bytes_per_float: int
    repeats: int
    others: float = float("nan")


def bench_step(
    name: str,
    d: int,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> StepRow:
    options = structure_options(name, d, args.k)
    family = Gaussian(d, name, dtype=DTYPE, **options)
    group = family.group
    params = [family.loc, family.factor]

    # fixed, finite Euclidean gradients on the storage pattern (||G||_2 ~ grad_scale for dense)
    family.loc.grad = torch.randn(d, generator=generator, dtype=DTYPE) * args.grad_scale
    dense_g = torch.randn(d, d, generator=generator, dtype=DTYPE) * (args.grad_scale / math.sqrt(d))
    family.factor.grad = group.restrict(dense_g).contiguous().clone()
    del dense_g
    saved = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    ngd = NaturalGradient(family, lr=args.lr, momentum=0.0)
    adam = torch.optim.Adam(params, lr=1e-3)

    # Adam on a dense problem of the same dimension: loc (d) and a d x d factor
    dense_params = [
        torch.nn.Parameter(torch.zeros(d, dtype=DTYPE)),
        torch.nn.Parameter(torch.eye(d, dtype=DTYPE)),
    ]
    dense_params[0].grad = family.loc.grad.clone()
    dense_params[1].grad = torch.randn(d, d, generator=generator, dtype=DTYPE) * (args.grad_scale / math.sqrt(d))
    adam_dense = torch.optim.Adam(dense_params, lr=1e-3)

    timed = [
        Timed(ngd.step, restore),
        Timed(adam.step, restore),
        Timed(adam_dense.step),
    ]
    measure_with_args(timed, args)
    for p in params:  # the timed steps must have stayed finite
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{name} d={d}: parameters became non-finite during timing")

    # memory: the real optimizer states after a step
    ngd_state_m0 = state_floats(ngd)
    restore()
    ngd_m = NaturalGradient(family, lr=args.lr, momentum=args.momentum)
    ngd_m.step()
    ngd_state_m = state_floats(ngd_m)
    restore()
    row = StepRow(
        structure=label(name, options),
        d=d,
        ngd=timed[0].median,
        adam=timed[1].median,
        adam_dense=timed[2].median,
        factor_numel=family.factor.numel(),
        loc_numel=family.loc.numel(),
        ngd_state_m0=ngd_state_m0,
        ngd_state_m=ngd_state_m,
        adam_state=state_floats(adam),
        adam_dense_params=sum(p.numel() for p in dense_params),
        adam_dense_state=state_floats(adam_dense),
        bytes_per_float=torch.finfo(DTYPE).bits // 8,
        repeats=len(timed[0].samples),
    )
    del family, ngd, ngd_m, adam, adam_dense, dense_params, timed
    gc.collect()
    return row


# --------------------------------------------------------------------------- part 3
@dataclass
class ScaleRow:
    structure: str
    d: int
    matvec: float
    solve: float
    numel: int
    others: float = float("nan")


def bench_scaling(name: str, d: int, args: argparse.Namespace, generator: torch.Generator) -> ScaleRow:
    options = structure_options(name, d, args.k)
    group = sgroups.make(name, d, **options)
    a = group.random(generator=generator, dtype=DTYPE)
    x = torch.randn(args.batch, d, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        err = (group.matvec(a, group.solve(a, x)) - x).abs().max().item()
    if not math.isfinite(err) or err > 1e-2 * max(1.0, x.abs().max().item()):
        raise RuntimeError(f"{name} d={d}: matvec(solve(x)) != x (max error {err:.3g})")
    timed = [Timed(lambda: group.matvec(a, x)), Timed(lambda: group.solve(a, x))]
    with torch.no_grad():
        measure_with_args(timed, args)
    return ScaleRow(label(name, options), d, timed[0].median, timed[1].median, group.numel())


# --------------------------------------------------------------------------- report
def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if c == "r" else "---" for c in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_step(rows: List[StepRow]) -> str:
    out = [
        "## 1. Time per optimizer step",
        "",
        "Median time per `step()`; the ratios compare timings sampled round-robin in the same run. "
        "`Adam (same)`: `torch.optim.Adam` on the same `loc` and `factor` tensors with the same grads. "
        "`Adam (dense)`: Adam on `loc` plus a dense `d x d` matrix (what full-covariance learning with "
        "Adam would optimize). `NGD / Adam dense` < 1 means the structured natural-gradient step is "
        "cheaper than a plain Adam step on a dense factor. `other CPU`: cores used by other processes "
        "while the row was measured (near 0 is a clean measurement).",
        "",
    ]
    body = [
        [
            r.structure,
            str(r.d),
            fmt_ms(r.ngd),
            fmt_ms(r.adam),
            fmt_ms(r.adam_dense),
            fmt_ratio(r.ngd / r.adam),
            fmt_ratio(r.ngd / r.adam_dense),
            str(r.repeats),
            f"{r.others:.2f}",
        ]
        for r in rows
    ]
    out.append(
        table(
            [
                "structure",
                "d",
                "NGD step ms",
                "Adam (same) ms",
                "Adam (dense) ms",
                "NGD / Adam",
                "NGD / Adam dense",
                "samples",
                "other CPU",
            ],
            body,
        )
    )
    # growth of the NGD step with d, to spot super-linear work in O(d k) groups
    dims = sorted({r.d for r in rows})
    by = {}
    for r in rows:
        by.setdefault(r.structure.split("(")[0], {})[r.d] = r
    if len(dims) > 1:
        out += [
            "",
            "Growth of the NGD step time with `d` (next to the growth of the stored entries, `factor.numel()`); "
            "an O(d k) group should grow about like its storage once the fixed Python overhead is small.",
            "",
        ]
        header = ["structure"] + [f"NGD ms d={d}" for d in dims]
        header += [f"time x ({a}->{b})" for a, b in zip(dims, dims[1:])]
        header += [f"numel x ({a}->{b})" for a, b in zip(dims, dims[1:])]
        body = []
        for name, per_d in by.items():
            if not all(d in per_d for d in dims):
                continue
            line = [name] + [fmt_ms(per_d[d].ngd) for d in dims]
            line += [fmt_ratio(per_d[b].ngd / per_d[a].ngd) for a, b in zip(dims, dims[1:])]
            line += [fmt_ratio(per_d[b].factor_numel / per_d[a].factor_numel) for a, b in zip(dims, dims[1:])]
            body.append(line)
        out.append(table(header, body))
    return "\n".join(out)


def report_memory(rows: List[StepRow], momentum: float) -> str:
    out = [
        "## 2. Memory: parameters plus optimizer state",
        "",
        f"Counted from the optimizers' `state` after a step (float32, {rows[0].bytes_per_float} bytes per float). "
        "`NGD m=0`: `NaturalGradient(momentum=0)` keeps no state, so its footprint is `loc` + `factor`. "
        f"`NGD m={momentum}`: one momentum buffer per parameter. `Adam (same)`: the same parameters plus "
        "`exp_avg`, `exp_avg_sq` (and a scalar `step` per parameter). `Adam (dense)`: `loc` + a dense "
        "`d x d` matrix with its Adam state.",
        "",
    ]
    body = []
    for r in rows:
        bpf = r.bytes_per_float
        params = r.factor_numel + r.loc_numel
        ngd0 = (params + r.ngd_state_m0) * bpf
        ngdm = (params + r.ngd_state_m) * bpf
        adam = (params + r.adam_state) * bpf
        dense = (r.adam_dense_params + r.adam_dense_state) * bpf
        body.append(
            [
                r.structure,
                str(r.d),
                f"{r.factor_numel:,}",
                f"{r.factor_numel / r.d ** 2:.4f}",
                f"{r.ngd_state_m0:,} / {r.ngd_state_m:,}",
                fmt_bytes(ngd0),
                fmt_bytes(ngdm),
                fmt_bytes(adam),
                fmt_bytes(dense),
                f"{ngdm / dense:.4f}",
            ]
        )
    out.append(
        table(
            [
                "structure",
                "d",
                "factor floats",
                "factor / d^2",
                f"NGD state floats (m=0 / m={momentum})",
                "NGD m=0 bytes",
                f"NGD m={momentum} bytes",
                "Adam (same) bytes",
                "Adam (dense) bytes",
                f"NGD m={momentum} / Adam dense",
            ],
            body,
        )
    )
    return "\n".join(out)


def report_scaling(rows: List[ScaleRow], batch: int) -> str:
    dims = sorted({r.d for r in rows})
    by: Dict[str, Dict[int, ScaleRow]] = {}
    for r in rows:
        by.setdefault(r.structure.split("(")[0], {})[r.d] = r
    out = [
        "## 3. Scaling of matvec / solve with d",
        "",
        f"Median time of `group.matvec(B, x)` and `group.solve(B, x)` for a batch `x` of {batch} vectors, "
        "`B = group.random()`. `x (a->b)` is the time ratio when `d` grows from a to b: about b/a for O(d k) "
        "work, (b/a)^2 for a dense matvec and up to (b/a)^3 for a dense solve (one LU factorization per call). "
        "At small `d` the O(d k) groups are dominated by a fixed Python/dispatch overhead, so their "
        "ratio is below b/a.",
        "",
    ]
    header = ["structure", "op"] + [f"ms d={d}" for d in dims] + [f"x ({a}->{b})" for a, b in zip(dims, dims[1:])]
    header.append("max other CPU")
    body = []
    for name, per_d in by.items():
        for op in ("matvec", "solve"):
            t = {d: getattr(per_d[d], op) for d in dims if d in per_d}
            line = [per_d[dims[-1]].structure if dims[-1] in per_d else name, op]
            line += [fmt_ms(t[d]) if d in t else "-" for d in dims]
            line += [fmt_ratio(t[b] / t[a]) if a in t and b in t else "-" for a, b in zip(dims, dims[1:])]
            line.append(f"{max(r.others for r in per_d.values()):.2f}")
            body.append(line)
    out.append(table(header, body, "ll" + "r" * (len(header) - 2)))
    out += ["", "Operation count: stored entries of one element (each matvec touches each once per vector).", ""]
    header = ["structure"] + [f"numel d={d}" for d in dims] + [f"numel / d^2 (d={d})" for d in dims]
    body = []
    for name, per_d in by.items():
        line = [name] + [f"{per_d[d].numel:,}" if d in per_d else "-" for d in dims]
        line += [f"{per_d[d].numel / d ** 2:.4f}" if d in per_d else "-" for d in dims]
        body.append(line)
    out.append(table(header, body))
    return "\n".join(out)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, argv: Sequence[str], load_start, load_end, elapsed: float, busy: str) -> str:
    cpu = cpu_name()
    return "\n".join(
        [
            "# structngd step-time and memory benchmark",
            "",
            f"- command: `python -m benchmarks.step_time{(' ' + ' '.join(argv)) if argv else ''}`",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- torch {torch.__version__}, python {platform.python_version()}, {cpu}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
            f"{' (set by --threads)' if args.threads else ' (default)'}, dtype float32",
            f"- load average at start / end: {load_start} / {load_end}; {busy} (other processes share the "
            "machine: compare ratios, not absolute times)",
            f"- NGD lr={args.lr}, fixed grads: loc ~ N(0, {args.grad_scale}^2), factor = restrict(G), "
            f"G ~ N(0, {args.grad_scale}^2/d) (d x d); k={args.k}; median of up to {args.repeats} samples "
            f"({args.slow_repeats} when a step takes > {args.slow}s), each sample about {args.target}s of calls",
            f"- total run time {elapsed:.0f}s",
        ]
    )


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=None, help="dimensions for step timing and memory (default 100 1000 4000)")
    p.add_argument("--scaling-dims", type=int, nargs="+", default=None, help="dimensions for matvec/solve scaling (default 1000 2000 4000)")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    p.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 7; --quick 3)")
    p.add_argument("--slow-repeats", type=int, default=3, help="samples when one call takes longer than --slow seconds")
    p.add_argument("--slow", type=float, default=1.0, help="seconds per call above which --slow-repeats is used")
    p.add_argument("--target", type=float, default=None, help="approximate seconds per sample (default 0.1; --quick 0.03)")
    p.add_argument("--max-calls", type=int, default=500, help="most calls in one sample")
    p.add_argument("--k", type=int, default=10, help="rank / block parameter of the structured groups")
    p.add_argument("--lr", type=float, default=0.05, help="NaturalGradient learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum used for the memory count")
    p.add_argument("--grad-scale", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=64, help="vectors per matvec/solve call")
    p.add_argument("--parts", nargs="+", default=["step", "scaling"], choices=["step", "scaling"],
                   help="'step' = parts 1 and 2 (time and memory), 'scaling' = part 3")
    p.add_argument("--quick", action="store_true", help="d = 100, 1000; scaling d = 250, 500, 1000; fewer repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="Markdown output (default benchmarks/results/step_time.md, "
                   "step_time_quick.md with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--busy", type=float, default=None,
                   help="redo a task when other processes used more than this many cores during it "
                   "(default: the cores torch's threads leave free + 0.3)")
    p.add_argument("--busy-retries", type=int, default=2, help="redos per task measured under load")
    p.add_argument("--max-wait", type=float, default=None,
                   help="total seconds to spend waiting for a quiet machine before redos (default 180; --quick 30)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.dims is None:
        args.dims = [100, 1000] if args.quick else [100, 1000, 4000]
    if args.scaling_dims is None:
        args.scaling_dims = [250, 500, 1000] if args.quick else [1000, 2000, 4000]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.max_wait is None:
        args.max_wait = 30.0 if args.quick else 180.0
    if args.target is None:
        args.target = 0.03 if args.quick else 0.1
    if args.out is None:
        name = "step_time_quick.md" if args.quick else "step_time.md"
        args.out = Path(__file__).resolve().parent / "results" / name
    return args


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads`` into torch, and the default ``--busy`` threshold: the cores torch leaves
    free plus a margin (other processes using more than that make a sample count as loaded)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.busy is None:
        args.busy = max(0, (os.cpu_count() or 1) - torch.get_num_threads()) + 0.3


def main(argv: Optional[Sequence[str]] = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    apply_threads(args)
    generator = torch.Generator().manual_seed(args.seed)
    monitor = CpuMonitor()
    waited, redone = 0.0, 0
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    begin = time.perf_counter()

    tasks = []
    if "step" in args.parts:
        tasks += [("step", s, d) for d in args.dims for s in args.structures]
    if "scaling" in args.parts:
        names = [s for s in SCALING_STRUCTURES if s in args.structures]
        tasks += [("scaling", s, d) for d in args.scaling_dims for s in names]
    progress = Progress(len(tasks), enabled=not args.no_progress)
    step_rows: List[StepRow] = []
    scale_rows: List[ScaleRow] = []
    try:
        for kind, name, d in tasks:
            progress.start(f"{kind} {name} d={d}")
            for attempt in range(args.busy_retries + 1):
                before = monitor.snapshot()
                bench = bench_step if kind == "step" else bench_scaling
                row = bench(name, d, args, generator)
                row.others = monitor.others(before, monitor.snapshot())
                if not row.others > args.busy or attempt == args.busy_retries or waited >= args.max_wait:
                    break
                redone += 1
                progress.start(f"{kind} {name} d={d}: others used {row.others:.1f} cores, waiting to redo")
                waited += monitor.wait_quiet(args.busy / 2, args.max_wait - waited)
                progress.start(f"{kind} {name} d={d} (redo {attempt + 1})")
            (step_rows if kind == "step" else scale_rows).append(row)
            progress.done()
    finally:
        progress.close()

    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    busy = (
        f"{redone} task(s) redone after other processes used > {args.busy} cores, {waited:.0f}s spent waiting "
        "for a quiet machine"
        if monitor.available
        else "background CPU use unknown (no /proc/stat)"
    )
    sections = [environment(args, argv, load_start, load_end, time.perf_counter() - begin, busy)]
    if step_rows:
        sections += [report_step(step_rows), report_memory(step_rows, args.momentum)]
    if scale_rows:
        sections.append(report_scaling(scale_rows, args.batch))
    text = "\n\n".join(sections) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
