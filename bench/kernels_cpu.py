"""CPU benchmark: chunked PyTorch scans vs the sequential reference (DESIGN §4).

    python bench/kernels_cpu.py [--B 1] [--T 2048] [--H 4] [--d 64] [--chunk 64]
                                [--repeats 7] [--ref-repeats 3] [--threads N]
                                [--clock wall|cpu]

Times forward and forward+backward of `kernels.delta_rule` and `kernels.momentum_rule`
(fp32, K = V = d): the median of --repeats runs of backend="torch" (after one warm-up)
and of --ref-repeats runs of backend="reference" (slow: a Python loop over tokens), the
two interleaved so that changes in machine load hit both alike. Prints the speedups and
the max abs error of the outputs and final states (fwd) and of the gradients of every
input (fwd+bwd).
"""
import functools
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from bench.common import result_footer  # noqa: E402
from cli import OneLineArgumentParser, positive_int  # noqa: E402


def make_inputs(op, B, T, H, d, seed=0):
    """Inputs in the models' ranges: unit-norm q, k (Titans/HOPE L2-normalise them),
    retention/momentum gates in (0.8, 1], DGD step eta/(1 + eta |k|^2) with eta in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    gate = lambda: 0.8 + 0.2 * torch.rand(B, T, H, generator=g)
    x = {"q": unit(), "k": unit(), "u": torch.randn(B, T, H, d, generator=g), "alpha": gate()}
    if op == "delta_rule":
        eta = torch.rand(B, T, H, generator=g)
        x["eta"] = eta / (1 + eta)
        x["initial_state"] = torch.randn(B, H, d, d, generator=g) * 0.1
    else:
        x["beta"] = gate()
        x["initial_state"] = torch.randn(B, H, d, d, generator=g) * 0.1
        x["initial_momentum"] = torch.randn(B, H, d, d, generator=g) * 0.1
    return x


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@functools.lru_cache(maxsize=8)
def loss_weights(shape, dtype):
    """Fixed weights w of the loss sum(w * output) that the backward starts from (every element
    its own gradient), made once per shape: by the warm-up, outside the timed runs (making them
    cost 1-3 % of a chunked fwd+bwd at the default shape, on both sides of the speedup)."""
    return torch.cos(torch.arange(math.prod(shape), dtype=dtype)).view(shape)


def run_once(op, x, backend, chunk, backward, clock=time.perf_counter):
    """One call; returns (seconds, outputs, grads or None)."""
    fn = getattr(kernels, op)
    leaves = {n: t.detach().requires_grad_(backward) for n, t in x.items()}
    start = clock()
    outs = fn(**leaves, chunk_size=chunk, backend=backend)
    grads = None
    if backward:
        loss = sum((o * loss_weights(o.shape, o.dtype)).sum() for o in outs)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    seconds = clock() - start
    return seconds, [o.detach() for o in outs], grads


def max_abs_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=positive_int, default=1)
    p.add_argument("--T", type=positive_int, default=2048)
    p.add_argument("--H", type=positive_int, default=4)
    p.add_argument("--d", type=positive_int, default=64, help="head dim, K = V = d")
    p.add_argument("--chunk", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=7, help="chunked runs")
    p.add_argument("--ref-repeats", type=positive_int, default=3, help="reference runs")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (with --threads 1: the work "
                        "done, which other jobs on a busy machine barely change)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]

    print(result_footer("kernels_cpu.py", sys.argv[1:] if argv is None else argv))
    print(f"load average {os.getloadavg()[0]:.2f}, {args.clock} clock")
    print(f"shape: B={args.B} T={args.T} H={args.H} K=V={args.d} chunk={args.chunk} fp32 CPU")
    header = f"{'op':<14}{'pass':<9}{'reference s':>12}{'chunked s':>12}{'speedup':>9}" \
             f"{'max abs err':>13}"
    print(header)
    print("-" * len(header))
    for op in ("delta_rule", "momentum_rule"):
        x = make_inputs(op, args.B, args.T, args.H, args.d)
        for backward in (False, True):
            run_once(op, x, "torch", args.chunk, backward)                    # warm-up
            # interleaved, so that a change in machine load hits both sides alike
            ref_runs, runs = [], []
            for i in range(max(args.repeats, args.ref_repeats)):
                if i < args.ref_repeats:
                    ref_runs.append(run_once(op, x, "reference", args.chunk, backward, clock))
                if i < args.repeats:
                    runs.append(run_once(op, x, "torch", args.chunk, backward, clock))
            ref_s = statistics.median(r[0] for r in ref_runs)
            chunk_s = statistics.median(r[0] for r in runs)
            _, ref_outs, ref_grads = ref_runs[-1]
            _, outs, grads = runs[-1]
            err = max_abs_err(outs, ref_outs)
            if backward:
                err = max(err, max_abs_err(grads, ref_grads))
            name = "fwd+bwd" if backward else "fwd"
            print(f"{op:<14}{name:<9}{ref_s:>12.4f}{chunk_s:>12.4f}{ref_s / chunk_s:>8.1f}x"
                  f"{err:>13.2e}")


if __name__ == "__main__":
    main()
