"""What every script in bench/ shares beyond cli.py (the one-line-error parser, the flag types,
the output-file checks): the model-shape flags, the config overrides told apart from the
bench's own arguments, one-line errors for bad input found after parsing, the check of
--device, and the machine / command / date (and versions) lines that go with each result into
BENCHMARKS.md.

    from bench.common import (add_model_shape_args, machine, report_error, result_footer,
                              split_overrides, timer, versions)
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


def split_overrides(argv):
    """(the bench's own arguments, the config overrides) of argv. Overrides are what
    config.parse_overrides reads: --section.key=value, or --section.key value (the next argument,
    unless it starts with "--"). Split before argparse sees them: parse_known_args took the
    value of `--model.arch hope` for the config path ("config file not found: hope") and a
    mistyped option's value too (`--warm 1`: "config file not found: 1")."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg[2:].split("=", 1)[0]:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                overrides.append(argv[i])
        else:
            own.append(arg)
        i += 1
    return own, overrides


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


def versions() -> str:
    """'torch X, triton Y' (triton where it imports): the same kernels compiled by two Triton
    releases spilled and ran differently (BENCHMARKS.md: 3.6.0 against 3.7.1)."""
    try:
        import triton
        return f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        return f"torch {torch.__version__}"


def result_footer(script: str, argv) -> str:
    """The 'command:', 'machine:' and 'date:' lines printed under a result, ready to paste
    into BENCHMARKS.md with it."""
    return (f"command: python bench/{script} {' '.join(argv)}".rstrip() + f"\nmachine: {machine()}\n"
            f"date: {datetime.date.today().isoformat()}, {versions()}")
