"""Per-step time of the Kronecker BNN posteriors against the baselines a user would pick, as ratios.

Two pairs, each timed round-robin in one process (windows of ``--steps`` steps, methods interleaved, the median
window per method), after warm-up:

1. Pyro: ``AutoKroneckerNormal`` + ``NGD(estimator="kronecker")`` against ``AutoNormal`` + ``pyro.optim.Adam``
   (and ``AutoStructuredNormal(diagonal)`` + ``NGD``) on ``models.BNN`` with one hidden layer of 50 ReLU units,
   full batch of the UCI size (455 x 13, the protocol of the UCI study), float32;
2. torch.nn: ``VariationalKFAC`` (dense factors, at ``update_every`` 1 and 10, and diagonal) against
   ``ivon.IVON`` on an MLP 784-256-256-10 at batch 128 (cross-entropy), float32.

Run ``python -m benchmarks.bnn_step --threads 1``; writes ``benchmarks/results/bnn_step.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "bnn_step.md"


def round_robin(steps: Dict[str, Callable[[], None]], windows: int, per_window: int, warmup: int) -> Dict[str, float]:
    """Median seconds per step of each callable, timed in interleaved windows."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(windows):
        for name, step in steps.items():
            begin = time.perf_counter()
            for _ in range(per_window):
                step()
            times[name].append((time.perf_counter() - begin) / per_window)
    return {name: statistics.median(values) for name, values in times.items()}


def round_robin_text(windows: int, per_window: int, begin: float) -> str:
    """The environment and protocol of a :func:`round_robin` timing that started at ``begin``."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()} CPU; medians of "
            f"{windows} round-robin windows of {per_window} steps; {time.perf_counter() - begin:.0f} s.")


def write_report(report: str, out: Path) -> str:
    """Write ``report`` to ``out`` (folders made) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    return report


def pyro_steps(n: int = 455, p: int = 13) -> Dict[str, Callable[[], None]]:
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    import models
    from structngd.pyro import NGD, AutoKroneckerNormal, AutoStructuredNormal

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, p, generator=g), torch.randn(n, generator=g)
    out = {}
    for name, guide, optim in (
        ("AutoNormal + Adam", AutoNormal, lambda: pyro.optim.Adam({"lr": 1e-2})),
        ("AutoKroneckerNormal + NGD (kronecker)", AutoKroneckerNormal, lambda: NGD(estimator="kronecker")),
        ("AutoStructuredNormal(diagonal) + NGD", lambda m: AutoStructuredNormal(m, structure="diagonal"), NGD),
    ):
        model = models.BNN(p, hidden=(50,), activation="relu")
        svi = SVI(model, guide(model), optim(), Trace_ELBO())  # the guides' parameter names differ: one store
        out[name] = lambda svi=svi: svi.step(x, y)
    return out


def torch_steps(batch: int = 128) -> Dict[str, Callable[[], None]]:
    import ivon

    from structngd.kron import VariationalKFAC

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 10))

    out = {}
    net = mlp()
    opt = ivon.IVON(net.parameters(), lr=0.1, ess=60000)

    def ivon_step(net=net, opt=opt):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        opt.step()

    out["ivon.IVON"] = ivon_step
    for name, options in (("VariationalKFAC dense", {}), ("VariationalKFAC dense, update_every 10",
                                                          {"update_every": 10}),
                          ("VariationalKFAC diagonal", {"structure": "diagonal"})):
        net = mlp()
        vk = VariationalKFAC(net, ess=60000, **options)

        def vk_step(net=net, vk=vk):
            vk.zero_grad()
            with vk.sampled_params(train=True):
                F.cross_entropy(net(x), y).backward()
            vk.step()

        out[name] = vk_step
    return out


def table(title: str, seconds: Dict[str, float], baseline: str) -> str:
    lines = [f"### {title}", "", f"| method | ms / step | ratio to {baseline} |", "| --- | ---: | ---: |"]
    for name, value in seconds.items():
        lines.append(f"| {name} | {1e3 * value:.2f} | {value / seconds[baseline]:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bnn_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    pyro_seconds = round_robin(pyro_steps(), args.windows, args.steps, warmup=5)
    torch.manual_seed(0)  # the weight noise of the torch.nn steps, whatever the Pyro steps drew
    torch_seconds = round_robin(torch_steps(), args.windows, args.steps, warmup=5)
    report = "\n\n".join([
        "## Per-step time of the Kronecker BNN posteriors",
        f"`python -m benchmarks.bnn_step{' --threads ' + str(args.threads) if args.threads else ''}`; "
        + round_robin_text(args.windows, args.steps, begin),
        table("Pyro: models.BNN 13-50-1 (ReLU), full batch 455, float32", pyro_seconds, "AutoNormal + Adam"),
        table("torch.nn: MLP 784-256-256-10, batch 128, float32", torch_seconds, "ivon.IVON"),
    ]) + "\n"
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
