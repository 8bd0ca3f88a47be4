"""Step time and memory of the Kronecker preconditioners (``structngd.kron``), as ratios to Adam
and to a measured floor, all in one process.

Every method trains its own copy of the same model on one fixed synthetic batch; a *step* is
the whole training step ``zero_grad; forward; loss.backward(); [pre.step()]; opt.step()``.
Methods:

* ``SGD`` (plain, no momentum) and ``Adam`` (the baseline: ratio 1);
* ``floor``: forward + backward + the two products ``G^{-1} dW A^{-1}`` per layer with fixed,
  precomputed dense ``(d_out, d_out)`` / ``(d_in, d_in)`` matrices (bias folded into ``d_in`` as
  the preconditioners do) + the plain SGD step: the least work any cached Kronecker
  preconditioner must do per step. It is also counted in FLOPs: forward ``2 sum rows d_in d_out``
  (``rows`` = examples x output locations), backward twice that, products
  ``2 (d_out^2 d_in + d_out d_in^2)`` per layer;
* ``KFAC``, ``EKFAC`` and ``LocalKFAC`` for every structure (``dense``, ``diagonal``,
  ``block_diagonal``, ``lower_triangular``, ``hierarchical``), each followed by plain SGD;
* ``singd.SINGD`` (if importable; momentum 0, so it is the same plain SGD step) with the
  matching structures ``dense``, ``diagonal``, ``block30diagonal``, ``hierarchical15_15``;
* ``kfac-pytorch`` is looked for (``import kfac``) and skipped when absent.

All preconditioners update their factors (and inverses / eigenbases / ``K``, ``C``) every
``--update-every`` (10) steps; a timed sample is a window of consecutive steps that is a multiple
of it, so the time per step is amortized over the updates. Samples are taken round-robin over
the methods (the starting method rotates every round) so machine load hits all alike, and the
median over ``--repeats`` samples is reported. Memory: the bytes of every tensor in the
preconditioner's (or optimizer's) ``state_dict()``, against the model's parameter bytes; on CUDA
also the peak ``torch.cuda.max_memory_allocated`` over a window of steps, above SGD's.

Run ``python -m benchmarks.kron_step --threads 2`` (MLP 784-512-512-10 at batch 1024 and 128,
a small CNN and a small ResNet-style CNN at batch 128), ``--quick`` (the batch-1024 MLP and the
CNN, fewer repeats), ``--large`` (MLP 4096 wide at batch 4096 and the ResNet at batch 256, for a
GPU). Writes ``benchmarks/results/kron_step.json`` and ``kron_step.md`` (``kron_step_quick.*``,
``kron_step_large.*``, or ``--out``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.step_time import CpuMonitor, Progress, apply_threads, cpu_name, fmt_bytes, fmt_ms, fmt_ratio, table
from structngd.kron import EKFAC, KFAC, LocalKFAC
from structngd.kron.capture import find_layers

try:  # optional comparison
    from singd.optim.optimizer import SINGD
except Exception:  # pragma: no cover - singd missing or broken
    SINGD = None

try:  # kfac-pytorch (optional; not a dependency)
    import kfac as kfac_pytorch  # type: ignore
except Exception:
    kfac_pytorch = None

STRUCTURES = ("dense", "diagonal", "block_diagonal", "lower_triangular", "hierarchical")
#: singd's structure matching each of ours (same block size / ranks), None = no counterpart
SINGD_STRUCTURES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "block_diagonal": "block30diagonal",
    "lower_triangular": None,  # singd's triltoeplitz is a different structure
    "hierarchical": "hierarchical15_15",
}
#: LocalKFAC group options matching singd's block30diagonal / hierarchical15_15
GROUP_OPTIONS = {"block_diagonal": {"block_size": 30}, "hierarchical": {"k1": 15, "k2": 15}}


# --------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


def make_mlp(dims: Sequence[int]) -> nn.Module:
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(channels: Tuple[int, int] = (32, 64), side: int = 28, classes: int = 10) -> nn.Module:
    """Conv 3x3 (1 -> c1) / ReLU / conv 3x3 stride 2 (c1 -> c2) / ReLU / conv 3x3 stride 2 (c2 -> c2)
    / ReLU / linear head."""
    c1, c2 = channels
    out_side = (side + 1) // 2
    out_side = (out_side + 1) // 2
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * out_side * out_side, classes),
    )


def make_resnet(width: int = 16, classes: int = 10) -> nn.Module:
    """A ResNet-style CNN for 3 x 32 x 32 inputs: stem, three stages of one basic block each
    (widths w, 2w, 4w; stride 2 from the second), global average pool, linear head.
    BatchNorm layers are not preconditioned (the optimizer still updates them)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResBlock(width, width, 1), ResBlock(width, 2 * width, 2), ResBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]  # one example
    batch: int
    classes: int = 10


def model_specs(args: argparse.Namespace) -> List[ModelSpec]:
    if args.tiny:  # for tests: a few milliseconds per step
        return [
            ModelSpec("mlp 20-16-10", lambda: make_mlp([20, 16, 10]), (20,), 8),
            ModelSpec("cnn 4-8", lambda: make_cnn((4, 8), side=8), (1, 8, 8), 4),
        ]
    if args.large:
        w = args.width or 4096
        specs = {
            "mlp": ModelSpec(f"mlp 784-{w}-{w}-{w}-10", lambda: make_mlp([784, w, w, w, 10]), (784,), args.batch or 4096),
            "resnet": ModelSpec("resnet w64", lambda: make_resnet(64), (3, 32, 32), args.batch or 256),
        }
        return [specs[m] for m in (args.models or ["mlp", "resnet"]) if m in specs]
    w = args.width or 512
    mlp = lambda: make_mlp([784, w, w, 10])  # noqa: E731
    specs = {
        "mlp": ModelSpec(f"mlp 784-{w}-{w}-10", mlp, (784,), args.batch or 1024),
        "mlp128": ModelSpec(f"mlp 784-{w}-{w}-10", mlp, (784,), args.batch or 128),
        "cnn": ModelSpec("cnn 32-64", lambda: make_cnn((32, 64)), (1, 28, 28), args.batch or 128),
        "resnet": ModelSpec("resnet w16", lambda: make_resnet(16), (3, 32, 32), args.batch or 128),
    }
    default = ["mlp", "cnn"] if args.quick else ["mlp", "mlp128", "cnn", "resnet"]
    return [specs[m] for m in (args.models or default)]


# --------------------------------------------------------------------------- FLOPs
@dataclass
class LayerShape:
    name: str
    d_in: int  # weight columns, without the bias coordinate
    d_out: int
    rows: int  # examples x output locations
    bias: bool

    @property
    def d_in_kron(self) -> int:
        """``d_in`` of the Kronecker factor ``A`` (bias folded in)."""
        return self.d_in + (1 if self.bias else 0)


def layer_shapes(model: nn.Module, x: torch.Tensor) -> List[LayerShape]:
    """Shapes of the preconditioned (``Linear`` / ``Conv2d``) layers for input batch ``x``."""
    layers, _ = find_layers(model)
    rows: Dict[str, int] = {}
    handles = []
    for layer in layers:
        def hook(module, inputs, output, name=layer.name, d_out=layer.out_dim):
            rows[name] = output.numel() // d_out
        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [
        LayerShape(layer.name, layer.weight[0].numel(), layer.out_dim, rows[layer.name], layer.bias is not None)
        for layer in layers
    ]


def floor_flops(shapes: Sequence[LayerShape]) -> Dict[str, int]:
    """FLOPs of the floor: forward ``2 rows d_in d_out``, backward twice the forward, and the two
    products ``G^{-1} dW A^{-1}``: ``2 (d_out^2 d_in + d_out d_in^2)`` with ``d_in`` including the
    bias coordinate (the shape of the preconditioned gradient matrix)."""
    forward = sum(2 * s.rows * s.d_in * s.d_out for s in shapes)
    products = sum(2 * (s.d_out ** 2 * s.d_in_kron + s.d_out * s.d_in_kron ** 2) for s in shapes)
    return {"forward": forward, "backward": 2 * forward, "products": products, "total": 3 * forward + products}


# --------------------------------------------------------------------------- memory
def tensor_bytes(obj, seen: Optional[set] = None) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (dicts, lists, tuples, and
    singd's ``StructuredMatrix`` objects)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        key = (obj.device, obj.untyped_storage().data_ptr()) if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "named_tensors") and callable(obj.named_tensors):  # singd StructuredMatrix
        return sum(tensor_bytes(t, seen) for _, t in obj.named_tensors())
    return 0


# --------------------------------------------------------------------------- methods
@dataclass
class Runner:
    """One method training its own copy of the model."""

    name: str
    family: str  # baseline / floor / kfac / ekfac / local / singd
    structure: str = ""
    step: Callable[[], None] = lambda: None
    state: Callable[[], int] = lambda: 0  # bytes of the method's state
    model: Optional[nn.Module] = None
    info: Dict[str, object] = field(default_factory=dict)
    post_time: float = 0.0  # seconds spent after backward (preconditioner + optimizer)
    samples: List[float] = field(default_factory=list)
    post_samples: List[float] = field(default_factory=list)
    others: List[float] = field(default_factory=list)
    update_post: List[float] = field(default_factory=list)  # after-backward seconds of factor-update steps
    steps: int = 0
    error: Optional[str] = None


def make_step(model: nn.Module, x, y, after_backward: Callable[[], None], zero: Callable[[], None], timer: Runner, cuda: bool):
    """The training step; on CPU also the seconds spent after ``backward`` (preconditioner and
    optimizer) accumulate in ``timer.post_time``."""

    def step():
        zero()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if cuda:
            after_backward()
        else:
            t0 = time.perf_counter()
            after_backward()
            timer.post_time += time.perf_counter() - t0
        timer.steps += 1

    return step


def build_runners(spec: ModelSpec, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                  generator: torch.Generator) -> Tuple[List[Runner], nn.Module, torch.Tensor, List[LayerShape]]:
    torch.manual_seed(args.seed)
    base = spec.build().to(device=device, dtype=dtype)
    x = torch.randn((spec.batch,) + spec.input_shape, generator=generator).to(device=device, dtype=dtype)
    y = torch.randint(0, spec.classes, (spec.batch,), generator=generator).to(device)
    shapes = layer_shapes(base, x)
    cuda = device.type == "cuda"
    methods = set(args.methods)
    runners: List[Runner] = []

    def add(name, family, structure, setup):
        if name.split("(")[0] not in methods and family not in methods and name not in methods:
            return
        r = Runner(name, family, structure)
        model = copy.deepcopy(base)
        r.model = model
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                after, zero, state = setup(model, r)
            notes = sorted({str(w.message) for w in caught})
            if notes:
                r.info["warnings"] = notes
            r.step, r.state = make_step(model, x, y, after, zero, r, cuda), state
        except Exception as err:  # e.g. a dtype a method does not support
            r.error = f"{type(err).__name__}: {err}"
        runners.append(r)

    def sgd(model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)

    def setup_sgd(model, r):
        opt = sgd(model, args.lr_sgd)
        return opt.step, opt.zero_grad, lambda: tensor_bytes(opt.state_dict()["state"])

    def setup_adam(model, r):
        opt = torch.optim.Adam(model.parameters(), lr=args.lr_adam)
        return opt.step, opt.zero_grad, lambda: tensor_bytes(opt.state_dict()["state"])

    def setup_floor(model, r):
        opt = sgd(model, args.lr_pre)
        layers, _ = find_layers(model)
        mats = []
        g = torch.Generator().manual_seed(args.seed + 1)
        for layer in layers:
            pair = []
            for d in (layer.out_dim, layer.in_dim):  # G^{-1} (d_out), A^{-1} (d_in incl. bias)
                m = torch.randn(d, d, generator=g) / d
                pair.append((torch.eye(d) + m @ m.mT).to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype))
            mats.append(pair)

        def after():
            with torch.no_grad():
                for layer, (g_inv, a_inv) in zip(layers, mats):
                    grad = layer.grad_matrix()
                    layer.set_grad_matrix((g_inv @ grad.to(g_inv.dtype) @ a_inv).to(grad.dtype))
            opt.step()

        return after, opt.zero_grad, lambda: tensor_bytes(mats)

    def setup_pre(cls, **kw):
        def setup(model, r):
            pre = cls(model, damping=args.damping, update_every=args.update_every, **kw)
            opt = sgd(model, args.lr_pre)
            if hasattr(pre, "structures"):
                used = sorted({s for pair in pre.structures.values() for s in pair})
                r.info["structures_used"] = used
                r.info["dense_fallbacks"] = sum(
                    1 for pair in pre.structures.values() for s in pair if s == "dense") if kw.get("structure") != "dense" else 0
                r.info["factors"] = 2 * len(pre.structures)

            def after():
                if pre.is_update_step and not cuda:
                    t0 = time.perf_counter()
                    pre.step()
                    opt.step()
                    r.update_post.append(time.perf_counter() - t0)
                else:
                    pre.step()
                    opt.step()

            r.info["preconditioner"] = pre
            return after, opt.zero_grad, lambda: tensor_bytes(pre.state_dict()["layers"])

        return setup

    add("SGD", "baseline", "", setup_sgd)
    add("Adam", "baseline", "", setup_adam)
    add("floor", "floor", "", setup_floor)
    add("KFAC", "kfac", "dense", setup_pre(KFAC, factor_decay=args.factor_decay))
    add("EKFAC", "ekfac", "dense", setup_pre(EKFAC, factor_decay=args.factor_decay))
    for s in args.structures:
        add(f"LocalKFAC({s})", "local", s, setup_pre(LocalKFAC, structure=s, group_options=GROUP_OPTIONS.get(s)))
    if SINGD is not None:
        for s in args.structures:
            singd_s = SINGD_STRUCTURES.get(s)
            if singd_s is None:
                continue

            def setup_singd(model, r, singd_s=singd_s):
                opt = SINGD(model, lr=args.lr_pre, momentum=0.0, damping=args.damping, T=args.update_every,
                            structures=(singd_s, singd_s), warn_unsupported=False)

                def state():
                    sd = opt.state_dict()
                    return tensor_bytes([sd[k] for k in ("Ks", "Cs", "m_Ks", "m_Cs", "H_Ks", "H_Cs")] + [sd["state"]])

                return opt.step, opt.zero_grad, state

            add(f"singd({singd_s})", "singd", s, setup_singd)
    for r in runners:  # the preconditioner object is only needed during setup
        r.info.pop("preconditioner", None)
    return runners, base, x, shapes


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sample(r: Runner, steps: int, device: torch.device) -> Tuple[float, float]:
    """Seconds per step over ``steps`` consecutive steps, and seconds per step after backward
    (the caller collects garbage beforehand: one ``gc.collect()`` per round, as it takes about
    0.2 s with torch imported)."""
    gc.disable()
    try:
        sync(device)
        r.post_time = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            r.step()
        sync(device)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / steps, r.post_time / steps


def guarded(r: Runner, fn):
    try:
        return fn()
    except Exception as err:
        r.error = f"{type(err).__name__}: {err}"
        return None


def measure(runners: List[Runner], args: argparse.Namespace, device: torch.device, monitor: CpuMonitor,
            progress: Progress, label: str, budget: Dict[str, float]) -> None:
    """Warm up (two update windows), calibrate one window per method, then ``repeats`` rounds of
    one sample per method, round-robin with a rotating start. A sample taken while other
    processes used more than ``--busy`` cores is retaken (``--busy-retries``, ``--max-wait``)."""
    window = args.update_every
    live = [r for r in runners if r.error is None]
    per_window = {}
    gc.collect()
    for r in live:
        progress.start(f"{label}: warm-up {r.name}")
        if guarded(r, lambda: run_sample(r, 2 * window, device)) is None:
            continue
        t = guarded(r, lambda: run_sample(r, window, device))
        if t is not None:
            per_window[r.name] = t[0] * window
    live = [r for r in live if r.error is None]
    slowest = max(per_window.values()) if per_window else 0.0
    # one window count for every method keeps the samples comparable; at least one window
    windows = max(1, int(round(args.target / slowest))) if slowest > 0 else 1
    windows = min(windows, args.max_windows)
    steps = windows * window
    for rnd in range(args.repeats):
        order = live[rnd % len(live):] + live[: rnd % len(live)] if live else []
        progress.start(f"{label}: round {rnd + 1}/{args.repeats} ({steps} steps per sample)")
        gc.collect()
        for r in order:
            if r.error is not None:
                continue
            for attempt in range(args.busy_retries + 1):
                before = monitor.snapshot()
                out = guarded(r, lambda: run_sample(r, steps, device))
                others = monitor.others(before, monitor.snapshot())
                if out is None:
                    break
                if not others > args.busy or attempt == args.busy_retries or budget["waited"] >= args.max_wait:
                    break
                budget["redone"] += 1
                budget["waited"] += monitor.wait_quiet(args.busy / 2, args.max_wait - budget["waited"])
            if out is not None:
                r.samples.append(out[0])
                r.post_samples.append(out[1])
                r.others.append(others)
        progress.done()
    for r in runners:
        r.info["steps_per_sample"] = steps


def cuda_peaks(runners: List[Runner], args: argparse.Namespace, device: torch.device) -> None:
    """Peak ``max_memory_allocated`` over a window of steps above the memory held before it."""
    for r in runners:
        if r.error is not None:
            continue
        gc.collect()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        if guarded(r, lambda: [r.step() for _ in range(args.update_every)]) is None:
            continue
        torch.cuda.synchronize(device)
        r.info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        r.info["cuda_held_bytes"] = before


# --------------------------------------------------------------------------- one model
def bench_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                monitor: CpuMonitor, progress: Progress, budget: Dict[str, float]) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    runners, base, x, shapes = build_runners(spec, args, device, dtype, generator)
    label = f"{spec.name} b={spec.batch}"
    measure(runners, args, device, monitor, progress, label, budget)
    if device.type == "cuda":
        cuda_peaks(runners, args, device)
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    flops = floor_flops(shapes)
    rows = []
    for r in runners:
        finite = r.model is not None and all(bool(torch.isfinite(p).all()) for p in r.model.parameters())
        state = guarded(r, r.state) if r.error is None else None
        row = {
            "method": r.name,
            "family": r.family,
            "structure": r.structure,
            "error": r.error,
            "ms": statistics.median(r.samples) * 1e3 if r.samples else None,
            "post_backward_ms": statistics.median(r.post_samples) * 1e3 if r.post_samples and device.type != "cuda" else None,
            "samples_ms": [s * 1e3 for s in r.samples],
            "update_step_post_backward_ms": statistics.median(r.update_post) * 1e3 if r.update_post else None,
            "others": r.others,
            "state_bytes": state,
            "state_over_params": state / param_bytes if state is not None else None,
            "parameters_finite": finite,
            "steps_run": r.steps,
            **{k: v for k, v in r.info.items()},
        }
        rows.append(row)
    by = {row["method"]: row for row in rows}

    def ratio(row, ref):
        if row["ms"] is None or ref not in by or by[ref]["ms"] is None:
            return None
        return row["ms"] / by[ref]["ms"]

    for row in rows:
        row["x_adam"] = ratio(row, "Adam")
        row["x_sgd"] = ratio(row, "SGD")
        row["x_floor"] = ratio(row, "floor")
        if "cuda_peak_bytes" in row and "SGD" in by and "cuda_peak_bytes" in by["SGD"]:
            row["cuda_peak_over_sgd_bytes"] = row["cuda_peak_bytes"] - by["SGD"]["cuda_peak_bytes"]
    out = {
        "model": spec.name,
        "batch": spec.batch,
        "parameters": sum(p.numel() for p in base.parameters()),
        "parameter_bytes": param_bytes,
        "layers": [asdict(s) for s in shapes],
        "flops": flops,
        "methods": rows,
    }
    if "floor" in by and by["floor"]["ms"]:
        out["floor_gflops_per_s"] = flops["total"] / (by["floor"]["ms"] * 1e-3) / 1e9
    if "SGD" in by and by["SGD"]["ms"]:
        out["sgd_gflops_per_s"] = 3 * flops["forward"] / (by["SGD"]["ms"] * 1e-3) / 1e9
    del runners, base
    gc.collect()
    return out


# --------------------------------------------------------------------------- report
def _r(x: Optional[float]) -> str:
    return "-" if x is None else fmt_ratio(x)


def report_model(res: dict, cuda: bool) -> str:
    f = res["flops"]
    lines = [
        f"## {res['model']}, batch {res['batch']}",
        "",
        f"{res['parameters']:,} parameters ({fmt_bytes(res['parameter_bytes'])}); preconditioned layers "
        + ", ".join(f"{s['name']} ({s['d_out']} x {s['d_in'] + int(s['bias'])}, {s['rows']:,} rows)" for s in res["layers"])
        + f". Floor FLOPs per step: forward {f['forward'] / 1e9:.3f} G, backward {f['backward'] / 1e9:.3f} G, "
        f"two products per layer {f['products'] / 1e9:.3f} G, total {f['total'] / 1e9:.3f} G"
        + (f" (measured floor: {res['floor_gflops_per_s']:.1f} GFLOP/s)" if "floor_gflops_per_s" in res else "")
        + ".",
        "",
    ]
    header = ["method", "ms / step", "x Adam", "x SGD", "x floor"]
    if not cuda:
        header += ["after-backward ms", "update step: after-backward ms"]
    header += ["state", "state / params"]
    if cuda:
        header.append("CUDA peak over SGD")
    header += ["other CPU (max)", "note"]
    body = []
    for m in res["methods"]:
        note = []
        if m["error"]:
            note.append(m["error"][:120])
        if m.get("dense_fallbacks"):
            note.append(f"dense on {m['dense_fallbacks']}/{m['factors']} factors")
        if m["error"] is None and not m["parameters_finite"]:
            note.append("non-finite parameters")
        line = [m["method"], "-" if m["ms"] is None else fmt_ms(m["ms"] / 1e3), _r(m["x_adam"]), _r(m["x_sgd"]), _r(m["x_floor"])]
        if not cuda:
            line.append("-" if m["post_backward_ms"] is None else fmt_ms(m["post_backward_ms"] / 1e3))
            upd = m.get("update_step_post_backward_ms")
            line.append("-" if upd is None else fmt_ms(upd / 1e3))
        line += [
            "-" if m["state_bytes"] is None else fmt_bytes(m["state_bytes"]),
            "-" if m["state_over_params"] is None else f"{m['state_over_params']:.2f}",
        ]
        if cuda:
            peak = m.get("cuda_peak_over_sgd_bytes")
            line.append("-" if peak is None else fmt_bytes(peak))
        line += [f"{max(m['others']):.2f}" if m["others"] else "-", "; ".join(note)]
        body.append(line)
    lines.append(table(header, body, "l" + "r" * (len(header) - 2) + "l"))
    return "\n".join(lines)


def report_summary(results: List[dict], args: argparse.Namespace) -> str:
    lines = [
        "## Summary: KFAC against the targets",
        "",
        f"Targets: KFAC <= 1.2x the floor, KFAC <= 1.6x Adam (CPU). Amortized over update_every={args.update_every}.",
        "",
    ]
    body = []
    for res in results:
        by = {m["method"]: m for m in res["methods"]}
        k = by.get("KFAC")
        if not k or k["ms"] is None:
            continue
        xf, xa = k["x_floor"], k["x_adam"]
        body.append([
            f"{res['model']} b={res['batch']}",
            fmt_ms(k["ms"] / 1e3),
            _r(xf) + ("" if xf is None else (" ok" if xf <= 1.2 else " MISS")),
            _r(xa) + ("" if xa is None else (" ok" if xa <= 1.6 else " MISS")),
            _r(by["floor"]["x_adam"]) if "floor" in by else "-",
            _r(by["EKFAC"]["x_floor"]) if "EKFAC" in by else "-",
            _r(by.get("LocalKFAC(dense)", {}).get("x_floor")),
            _r(by.get("singd(dense)", {}).get("x_floor")),
        ])
    lines.append(table(["setting", "KFAC ms", "KFAC / floor", "KFAC / Adam", "floor / Adam", "EKFAC / floor",
                        "LocalKFAC(dense) / floor", "singd(dense) / floor"], body))
    return "\n".join(lines)


def environment(args, argv, device, dtype, elapsed, budget, load_start, load_end) -> Dict[str, object]:
    cpu = cpu_name()
    env = {
        "command": "python -m benchmarks.kron_step" + ((" " + " ".join(argv)) if argv else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "singd": getattr(sys.modules.get("singd"), "__version__", "installed") if SINGD is not None else "not importable",
        "kfac_pytorch": "installed (not benchmarked: different API)" if kfac_pytorch is not None else "not installed (skipped)",
        "update_every": args.update_every,
        "damping": args.damping,
        "factor_decay": args.factor_decay,
        "repeats": args.repeats,
        "elapsed_s": round(elapsed, 1),
        "samples_redone_under_load": budget["redone"],
        "seconds_waiting_for_quiet": round(budget["waited"], 1),
        "busy_threshold_cores": args.busy,
        "load_average_start_end": [load_start, load_end],
    }
    return env


def report(env: Dict[str, object], results: List[dict], args: argparse.Namespace, cuda: bool) -> str:
    head = [
        "# Kronecker preconditioners: step time and memory",
        "",
        f"- command: `{env['command']}`",
        f"- {env['date']}; torch {env['torch']}, python {env['python']}, {env['cpu']}, {env['cpus']} CPUs, "
        f"torch threads {env['torch_threads']}; device {env['device']}, dtype {env['dtype']}",
        f"- singd: {env['singd']}; kfac-pytorch: {env['kfac_pytorch']}",
        f"- damping {args.damping}, factor_decay {args.factor_decay} (KFAC, EKFAC), update_every {args.update_every} "
        f"for every preconditioner; plain SGD after each preconditioner (singd: momentum 0); median of "
        f"{args.repeats} samples per method, each a window of consecutive steps that is a multiple of update_every, "
        "round-robin over the methods",
        f"- {env['samples_redone_under_load']} sample(s) retaken under load, {env['seconds_waiting_for_quiet']} s "
        f"waiting; load average start / end {env['load_average_start_end'][0]} / {env['load_average_start_end'][1]}; "
        f"total {env['elapsed_s']} s",
        "",
        "`x floor`: time over the floor (forward + backward + two dense products per layer + SGD step). "
        "`after-backward ms`: time per step spent in `pre.step()` + `opt.step()` (or the floor's products), "
        "amortized; `update step`: the same on the factor-update steps alone (KFAC, EKFAC, LocalKFAC; the statistics "
        "themselves are gathered by hooks in the forward and backward passes of those steps). "
        "`state`: bytes of the tensors in the preconditioner's `state_dict()` (optimizers: their state). "
        "`other CPU`: cores used by other processes during the worst sample (near 0 is clean).",
    ]
    sections = ["\n".join(head), report_summary(results, args)] + [report_model(r, cuda) for r in results]
    return "\n\n".join(sections) + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kron_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model (and data) dtype; KFAC / EKFAC keep factors and inverses in float32, "
                   "LocalKFAC and singd precondition in the model's dtype")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--models", nargs="+", default=None, choices=["mlp", "mlp128", "cnn", "resnet"],
                   help="default: mlp mlp128 cnn resnet (--quick: mlp cnn; --large: mlp resnet)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset by name or family: SGD Adam floor KFAC EKFAC LocalKFAC singd (default: all)")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    p.add_argument("--width", type=int, default=None, help="MLP hidden width (default 512; --large 4096)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--repeats", type=int, default=None, help="samples per method (default 7; --quick 3)")
    p.add_argument("--target", type=float, default=None,
                   help="seconds of the slowest method's sample (default 1.0; --quick 0.5); windows per sample follow")
    p.add_argument("--max-windows", type=int, default=20, help="most update windows in one sample")
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--factor-decay", type=float, default=0.95)
    p.add_argument("--lr-pre", type=float, default=1e-4, help="SGD learning rate after a preconditioner (and singd's)")
    p.add_argument("--lr-sgd", type=float, default=1e-2)
    p.add_argument("--lr-adam", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="MLP batch 1024 and the CNN; fewer repeats")
    p.add_argument("--large", action="store_true", help="MLP 784-4096-4096-4096-10 at batch 4096 and the ResNet (width 64) "
                   "at batch 256: sizes for a GPU")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny models, one sample
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (the Markdown goes beside it with .md); default benchmarks/results/kron_step.json")
    p.add_argument("--busy", type=float, default=None,
                   help="retake a sample when other processes used more than this many cores during it "
                   "(default: cores left free by torch's threads + 0.3)")
    p.add_argument("--busy-retries", type=int, default=2)
    p.add_argument("--max-wait", type=float, default=None, help="total seconds of waiting for a quiet machine (default 180; --quick 30)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    families = ["SGD", "Adam", "floor", "KFAC", "EKFAC", "LocalKFAC", "singd"]
    args.methods = args.methods or families
    alias = {"LocalKFAC": "local", "singd": "singd"}
    args.methods = set(args.methods) | {alias[m] for m in args.methods if m in alias}
    if args.tiny:
        args.repeats = args.repeats or 1
        args.target = 0.0 if args.target is None else args.target
        args.max_wait = 0.0 if args.max_wait is None else args.max_wait
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.target is None:
        args.target = 0.5 if args.quick else 1.0
    if args.max_wait is None:
        args.max_wait = 30.0 if args.quick else 180.0
    if args.out is None:
        name = "kron_step_large" if args.large else "kron_step_quick" if args.quick else "kron_step"
        if args.dtype != "float32":
            name += f"_{args.dtype}"
        if args.device != "cpu":
            name += f"_{args.device}"
        args.out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    apply_threads(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # no denormal slow paths in any method
    monitor = CpuMonitor()
    budget = {"waited": 0.0, "redone": 0}
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    begin = time.perf_counter()
    specs = model_specs(args)
    progress = Progress(len(specs) * args.repeats, enabled=not args.no_progress)
    results = []
    try:
        for spec in specs:
            results.append(bench_model(spec, args, device, dtype, monitor, progress, budget))
    finally:
        progress.close()
    load_end = " ".join(f"{v:.2f}" for v in os.getloadavg())
    env = environment(args, argv, device, dtype, time.perf_counter() - begin, budget, load_start, load_end)
    text = report(env, results, args, device.type == "cuda")
    print(text)
    out = {"environment": env, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(f"written to {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
