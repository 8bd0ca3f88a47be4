"""Per-step cost of ``KFACOptimizer`` against the preconditioner recipe it replaces and against Adam, as ratios.

One process, round-robin windows (the median window per method), on an MLP with cross-entropy, float32:

* ``Adam``: ``loss.backward(); adam.step()``;
* ``KFAC + SGD``: ``loss.backward(); KFAC(model).step(); sgd.step()`` (the preconditioner-style recipe);
* ``KFACOptimizer``: ``opt.step(closure)`` at its defaults (the quadratic model's Gauss-Newton products by one
  batched forward-mode pass, the Levenberg-Marquardt re-evaluation every ``adapt_every`` steps);
* ``forward + backward``: the closure alone, the unit in which the optimizer's extra work is reported:
  ``(KFACOptimizer - KFAC + SGD) / (forward + backward)``.

Both Kronecker methods refresh their factors every ``update_every`` steps (the same value for both). Run
``python -m benchmarks.kfac_optimizer_step --threads 1``; writes ``benchmarks/results/kfac_optimizer_step.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .bnn_step import round_robin, round_robin_text, write_report

RESULTS = Path(__file__).resolve().parent / "results" / "kfac_optimizer_step.md"


def mlp(sizes: Sequence[int]) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def steps(sizes: Sequence[int], batch: int, update_every: int) -> Dict[str, Callable[[], None]]:
    """The four callables, each on its own copy of the same initial network and one fixed batch."""
    from structngd.kron import KFAC, KFACOptimizer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch,), generator=g)

    def closure_for(net, opt):
        def closure():
            opt.zero_grad()
            outputs = net(x)
            loss = F.cross_entropy(outputs, y)
            loss.backward()
            return loss, outputs
        return closure

    out: Dict[str, Callable[[], None]] = {}
    net = mlp(sizes)
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    adam_closure = closure_for(net, adam)
    out["Adam"] = lambda: (adam_closure(), adam.step())
    net = mlp(sizes)
    pre, sgd = KFAC(net, update_every=update_every), torch.optim.SGD(net.parameters(), lr=1e-3)
    sgd_closure = closure_for(net, sgd)
    out["KFAC + SGD"] = lambda: (sgd_closure(), pre.step(), sgd.step())
    net = mlp(sizes)
    opt = KFACOptimizer(net, update_every=update_every)
    opt_closure = closure_for(net, opt)
    out["KFACOptimizer"] = lambda: opt.step(opt_closure)
    net = mlp(sizes)
    plain = torch.optim.SGD(net.parameters(), lr=0.0)
    out["forward + backward"] = closure_for(net, plain)
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kfac_optimizer_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 512, 512, 10], help="MLP layer widths")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--update-every", type=int, default=10, help="factor refresh period of both Kronecker methods")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per window (a multiple of --update-every "
                        "and of KFACOptimizer's adapt_every, 5, keeps every window alike)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    seconds = round_robin(steps(args.sizes, args.batch, args.update_every), args.windows, args.steps, warmup=10)
    unit = seconds["forward + backward"]
    extra = (seconds["KFACOptimizer"] - seconds["KFAC + SGD"]) / unit
    lines = ["| method | ms / step | ratio to Adam | in forward + backward passes |", "| --- | ---: | ---: | ---: |"]
    for name, value in seconds.items():
        lines.append(f"| {name} | {1e3 * value:.4g} | {value / seconds['Adam']:.3g}x | {value / unit:.3g} |")
    arch = "-".join(map(str, args.sizes))
    command = "python -m benchmarks.kfac_optimizer_step" + (f" --threads {args.threads}" if args.threads else "")
    report = "\n\n".join([
        "## KFACOptimizer per step",
        f"`{command}`; MLP {arch} (ReLU), batch {args.batch}, cross-entropy, float32, update_every "
        f"{args.update_every}; " + round_robin_text(args.windows, args.steps, begin),
        "\n".join(lines),
        f"KFACOptimizer's work beyond KFAC + SGD: {extra:.2f} forward + backward passes per step.",
    ]) + "\n"
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
