"""CPU benchmark: Titans-LMM training-step time vs Transformer++ at about equal parameters.

    python bench/titans_cpu.py [--T 1024] [--batch 1] [--d-model 256] [--n-layer 4]
                               [--n-head 4] [--vocab 512] [--chunk 16] [--depth 2]
                               [--step-budget B] [--steps 3] [--threads N]

One training step = forward + backward + AdamW on random tokens (fp32, eager). The
Transformer++ gets the same d_model, heads and vocabulary, and as many layers as brings
its parameter count closest to the Titans model's (a Titans-LMM block has ~14.4 d^2
parameters with a depth-2 memory, ~13.6 d^2 with depth 1; a Transformer++ block ~12.3 d^2). A small vocabulary keeps the LM head from
dominating. Prints a table with the median of --steps timed steps (after one warm-up)
plus the command, machine and date, ready for BENCHMARKS.md. Its "mem GFLOP/tok" column is
the memory's inner loop per token, forward + backward (model.memory_flops_per_token: writes,
scans, reads), which the 6N of the parameters does not count.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_model_shape_args, report_error, result_footer  # noqa: E402
from bench.step import make_train_step, median_seconds  # noqa: E402
from cli import OneLineArgumentParser, positive_float, positive_int  # noqa: E402
from model import build_model  # noqa: E402


def step_times(model, batch, T, vocab, steps):
    """Median seconds of one forward + backward + AdamW step on random tokens (bench/step.py's
    training step), after one warm-up step."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, T + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return median_seconds(make_train_step(model, opt, idx), steps, warmup=1)


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=positive_int, default=1024)
    p.add_argument("--batch", type=positive_int, default=1)
    add_model_shape_args(p, d_model=256, n_layer=4, n_head=4, vocab=512)
    p.add_argument("--chunk", type=positive_int, default=16, help="Titans memory chunk size C")
    p.add_argument("--depth", type=int, choices=(1, 2), default=2, help="memory depth")
    p.add_argument("--step-budget", type=positive_float, default=None,
                   help="model.titans.step_budget (default: none, the paper's update)")
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")

    common = {"vocab_size": args.vocab, "n_head": args.n_head, "d_model": args.d_model,
              "max_seq_len": args.T}
    torch.manual_seed(0)
    try:    # a shape the models cannot be built with: one line (ConfigError is a ValueError)
        titans = build_model({**common, "arch": "titans", "n_layer": args.n_layer,
                              "titans": {"variant": "lmm", "chunk_size": args.chunk,
                                         "memory_depth": args.depth, "step_budget": args.step_budget}})
        candidates = [build_model({**common, "arch": "transformer", "n_layer": n})
                      for n in range(max(1, args.n_layer - 2), args.n_layer + 3)]
    except ValueError as e:
        return report_error(e)
    target = titans.num_params()
    transformer = min(candidates, key=lambda m: abs(m.num_params() - target))

    rows = []
    for name, model in (("Transformer++", transformer), ("Titans-LMM", titans)):
        seconds = step_times(model, args.batch, args.T, args.vocab, args.steps)
        rows.append((name, model.config.n_layer, model.num_params(), seconds,
                     args.batch * args.T / seconds, model.memory_flops_per_token(args.T)))
    print(f"{'model':<14} {'layers':>6} {'params':>9} {'s/step':>8} {'tok/s':>8} {'mem GFLOP/tok':>13}")
    for name, layers, n, seconds, tok_s, mem_flops in rows:
        print(f"{name:<14} {layers:>6} {n / 1e6:>8.2f}M {seconds:>8.3f} {tok_s:>8.0f} {mem_flops / 1e9:>13.4f}")
    print(f"Titans-LMM / Transformer++ step time: {rows[1][3] / rows[0][3]:.2f}x")
    print(result_footer("titans_cpu.py", sys.argv[1:] if argv is None else argv))
    print(f"settings: T={args.T} batch={args.batch} d_model={args.d_model} heads={args.n_head} "
          f"vocab={args.vocab} memory depth={args.depth} chunk={args.chunk} step budget={args.step_budget}, "
          "fp32 eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
