"""What every script in bench/ shares: its argument parser (one-line errors), the argparse
types of its count flags, the model-shape flags, the checks of --device and of output files,
and the machine / command / date lines that go with each result into BENCHMARKS.md.

    from bench.common import (ArgumentParser, add_model_shape_args, machine, non_negative_int,
                              output_file_problem, positive_int, report_error, resolve_device,
                              result_footer)
"""
import argparse
import datetime
import os
import platform
import sys

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, "error: argument --steps: ...", and exit
    status 2 (argparse's own prints the usage block above it)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def report_error(error) -> int:
    """A bench CLI's answer to bad input: one line "error: <message>" on stderr (the first line
    of an exception's message) -> exit status 2, for main to return."""
    text = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {text[0]}", file=sys.stderr)
    return 2


def resolve_device(device: str) -> str:
    """--device auto|cpu|cuda -> the device to use; cuda without CUDA is a ValueError naming
    the flag."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("argument --device: cuda is not available on this machine (use --device cpu or auto)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def output_file_problem(path: str):
    """Why a result file cannot be written at `path` (None when it can), checked before a
    benchmark runs so that its result is not lost to a bad path: a directory, a missing parent
    directory, or one without write permission."""
    if os.path.isdir(path):
        return "is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"cannot be created: directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: no write permission in {parent}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "exists and is not writable"
    return None


def write_text_atomic(path: str, text: str):
    """Write `text` to `path` through a temporary file beside it: a failed write leaves no
    half-written file (and no temporary one) behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
