"""What every script in bench/ shares: the argparse types of its count flags, the model-shape
flags, and the machine / command / date lines that go with each result into BENCHMARKS.md.

    from bench.common import add_model_shape_args, machine, non_negative_int, positive_int, result_footer
"""
import argparse
import datetime
import os
import platform

import torch


def int_at_least(low: int, name: str):
    """An argparse type for counts: an int >= low, else the one-line usage error
    'argument --steps: expected <name>; got 0'."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {name}; got {value}")
        return value
    parse.__name__ = name
    return parse


positive_int = int_at_least(1, "a positive integer")                   # sizes, steps, repeats
non_negative_int = int_at_least(0, "an integer >= 0")                   # warm-up steps, table rows


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
