"""HOPE vs Transformer++ training-step time on CPU at (about) equal parameters.

    python bench/hope_cpu.py                       # the quickstart shapes: d128, 4 layers, T128, batch 16
    python bench/hope_cpu.py --vocab 257 --profile-rows 20

Both models have the same width, depth, vocabulary and batch; HOPE's CMS levels use
hidden 1.75 d (two levels + W_v = 8 d^2, a SwiGLU FFN's 8 d^2) so the parameter counts
match to a few percent (printed). Each step is forward + backward + AdamW on random tokens
(bench/step.py). Then one HOPE step runs under torch.profiler: a table of the top ops by
self CPU time, and the forward time of each part of the model (records placed by hooks).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_model_shape_args, report_error, result_footer  # noqa: E402
from bench.step import bench_step, build_train_step  # noqa: E402
from cli import OneLineArgumentParser, non_negative_int, positive_int  # noqa: E402
from config import load_config  # noqa: E402


def make_config(arch, args):
    overrides = [f"--model.arch={arch}", f"--model.d_model={args.d_model}", f"--model.n_layer={args.n_layer}",
                 f"--model.n_head={args.n_head}", f"--model.vocab_size={args.vocab}",
                 f"--train.seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}"]
    if arch == "hope":
        overrides += ["--model.cms.hidden_mult=1.75"]
    return load_config(None, overrides)


def label_forwards(model):
    """Wrap the forward of each block's mixer and ffn, the HOPE stages and the LM head in
    profiler records, so the profile says which part of the model the time belongs to."""
    from hope import SelfModifyingTitans
    records = []

    def wrap(module, name):
        def enter(mod, inputs):
            rec = torch.profiler.record_function(name)
            rec.__enter__()
            records.append(rec)

        def leave(mod, inputs, output):
            records.pop().__exit__(None, None, None)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def wrap_method(obj, attr, name):
        inner = getattr(obj, attr)

        def labelled(*args, **kwargs):
            with torch.profiler.record_function(name):
                return inner(*args, **kwargs)
        setattr(obj, attr, labelled)

    for block in model.blocks:
        wrap(block.mixer, "forward: mixer (" + type(block.mixer).__name__ + ")")
        wrap(block.ffn, "forward: ffn (" + type(block.ffn).__name__ + ")")
        if isinstance(block.mixer, SelfModifyingTitans):
            wrap_method(block.mixer, "_projection_piece", "forward: mixer stage 1 (projection memories)")
            wrap_method(block.mixer.memory, "update_piece", "forward: mixer stage 2 (M_mem scans)")
    wrap(model.head, "forward: LM head")


def profile_step(cfg, rows):
    """One HOPE training step (bench/step.py's, after one warm-up) under torch.profiler ->
    (the forward records of label_forwards, the step's total self CPU time, the op table)."""
    model, step = build_train_step(cfg, "cpu")
    step()                                                            # warm-up
    label_forwards(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages()
    parts = sorted((e for e in table if e.key.startswith("forward:")), key=lambda e: -e.cpu_time_total)
    total = sum(e.self_cpu_time_total for e in table)
    ops = table.table(sort_by="self_cpu_time_total", row_limit=rows)
    return parts, total, ops


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
        parts, total, ops = profile_step(configs["hope"], args.profile_rows)
        print(f"\nHOPE step, forward time by part (CPU total incl. children; whole step self time "
              f"{total / 1e3:.0f} ms):")
        for e in parts:
            print(f"  {e.key:<60} {e.cpu_time_total / 1e3:8.1f} ms  ({e.count} calls)")
        print("\nHOPE step, top ops by self CPU time (forward + backward + AdamW):")
        print(ops)
    print(result_footer("hope_cpu.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
