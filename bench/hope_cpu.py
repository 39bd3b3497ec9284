"""HOPE vs Transformer++ training-step time on CPU at (about) equal parameters.

    python bench/hope_cpu.py                       # d128, 4 layers, T128, batch 16, GPT-2 vocab
    python bench/hope_cpu.py --vocab 257 --profile-rows 20

Both models have the same width, depth, vocabulary and batch, and the config defaults
otherwise (by default: hope_tiny's and transformer_tiny's models, chunks 16 / 64 and CMS
[16, null]; not quickstart's). HOPE's CMS levels use hidden 1.75 d (two levels + W_v = 8 d^2,
a SwiGLU FFN's 8 d^2), so only the mixers differ: ~6.5 d^2 per HOPE block against
attention's 4 d^2. The totals (printed) are 2 % apart at the GPT-2 vocabulary, 18 % at
--vocab 257. Each step is forward + backward + AdamW on random tokens
(bench/step.py). Then one HOPE step runs under torch.profiler: a table of the top ops by
self CPU time, and the forward time of each part of the model (records placed by hooks).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_model_shape_args, report_error, result_footer  # noqa: E402
from bench.step import bench_step, build_train_step, print_profile, profile_step  # noqa: E402
from cli import OneLineArgumentParser, non_negative_int, positive_int  # noqa: E402
from config import load_config  # noqa: E402


def make_config(arch, args):
    overrides = [f"--model.arch={arch}", f"--model.d_model={args.d_model}", f"--model.n_layer={args.n_layer}",
                 f"--model.n_head={args.n_head}", f"--model.vocab_size={args.vocab}",
                 f"--train.seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}"]
    if arch == "hope":
        overrides += ["--model.cms.hidden_mult=1.75"]
    return load_config(None, overrides)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape_args(p, d_model=128, n_layer=4, n_head=4, vocab=50257)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--profile-rows", type=non_negative_int, default=15, help="rows of the op table (0 = no profile)")
    args = p.parse_args(argv)
    try:    # a bad shape (ConfigError), or a model it cannot build: one line, before any timing
        configs = {arch: make_config(arch, args) for arch in ("transformer", "hope")}
        built = {arch: build_train_step(cfg, "cpu") for arch, cfg in configs.items()}
    except ValueError as e:
        return report_error(e)
    results = {arch: bench_step(cfg, args.steps, args.warmup, "cpu", built=built.pop(arch))
               for arch, cfg in configs.items()}
    print("| model | params | ms/step | tokens/s |\n|---|---:|---:|---:|")
    for arch, r in results.items():
        print(f"| {arch} | {r['params'] / 1e6:.2f}M | {r['sec_per_step'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} |")
    ratio = results["hope"]["sec_per_step"] / results["transformer"]["sec_per_step"]
    print(f"HOPE / Transformer++ step time: {ratio:.2f}x (goal <= 2x)")
    if args.profile_rows:
        model, step = build_train_step(configs["hope"], "cpu")
        step()                                                        # warm-up
        print_profile(*profile_step(model, step, args.profile_rows), "HOPE step")
    print(result_footer("hope_cpu.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
