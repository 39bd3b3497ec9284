"""What every script in bench/ shares beyond cli.py (the one-line-error parser, the flag types,
the output-file checks): the model-shape flags, one-line errors for bad input found after
parsing, the check of --device, and the machine / command / date lines that go with each
result into BENCHMARKS.md.

    from bench.common import add_model_shape_args, machine, report_error, result_footer, timer
"""
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from cli import positive_int


def report_error(error) -> int:
    """A bench CLI's answer to bad input: one line "error: <message>" on stderr (the first line
    of an exception's message) -> exit status 2, for main to return."""
    text = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {text[0]}", file=sys.stderr)
    return 2


def timer(fn, device, repeats):
    """Median seconds of fn() (fn runs to completion; CUDA: do_bench synchronises)."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()                                                   # warm-up (and interpreter tracing)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_model_shape_args(p, d_model: int, n_layer: int, n_head: int, vocab: int):
    """--d-model, --n-layer, --n-head and --vocab (positive ints, these defaults) for the
    benchmarks that build their models from a shape."""
    p.add_argument("--d-model", type=positive_int, default=d_model)
    p.add_argument("--n-layer", type=positive_int, default=n_layer)
    p.add_argument("--n-head", type=positive_int, default=n_head)
    p.add_argument("--vocab", type=positive_int, default=vocab, help="vocabulary size (50257 = GPT-2, 257 = bytes)")


def machine() -> str:
    """The machine a result was measured on: the GPU's name, else the CPU, its cores and
    torch's intra-op threads (CPU timings depend on all three)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def result_footer(script: str, argv) -> str:
    """The 'command:', 'machine:' and 'date:' lines printed under a result, ready to paste
    into BENCHMARKS.md with it."""
    return (f"command: python bench/{script} {' '.join(argv)}".rstrip() + f"\nmachine: {machine()}\n"
            f"date: {datetime.date.today().isoformat()}, torch {torch.__version__}")
