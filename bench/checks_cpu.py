"""What two safety checks cost, CPU: the non-finite-weights screen that every checkpoint load
and save runs (checkpoint.first_non_finite), and data preparation's peak memory for one
large document (docs/DATA.md, "Memory").

    python bench/checks_cpu.py configs/transformer_340m.yaml configs/hope_340m.yaml --doc-mb 64

The screen is timed on the config's model (--vocab, GPT-2's by default; fp32, one torch thread)
against an element-wise torch.isfinite(p).all() per parameter (median of --repeats after a
warm-up, bench.common.timer). The preparation runs
`python -m data.prepare` (--tokenizer, one worker) in child processes on small documents,
then with one generated .txt document of --doc-mb MB more, and reports their peak resident
memory (each child's own: VmHWM, Linux) and the growth per MB of the large document. Prints the
rows plus the command, machine and date, ready for BENCHMARKS.md.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import report_error, result_footer, timer  # noqa: E402
from cli import OneLineArgumentParser, positive_float, positive_int  # noqa: E402
from config import load_config  # noqa: E402


def screen_seconds(cfg, repeats: int) -> tuple[int, float, float]:
    """(parameters, seconds of first_non_finite, seconds of isfinite(p).all() per parameter)."""
    from checkpoint import first_non_finite
    from model import build_model
    model = build_model(cfg.model)

    screen = timer(lambda: first_non_finite(model), "cpu", repeats)
    elementwise = timer(lambda: all(bool(torch.isfinite(p).all()) for p in model.parameters()), "cpu", repeats)
    return model.num_params(), screen, elementwise


# data.prepare in a child that writes its own peak resident KB to argv[1]: VmHWM, the high-water
# mark of the memory mapped since exec. Not ru_maxrss (getrusage, wait4): Linux carries the
# parent's peak (this process, torch imported: ~220 MB) into the child's across fork + exec, so
# data.prepare's own ~35 MB base read as the parent's and hid most of the growth.
PREPARE_WITH_PEAK = """
import sys
from data.prepare import main
try:
    main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        peak_kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(sys.argv[1], "w") as f:
        f.write(peak_kb)
"""


def prepare_child_peak_mb(prepare_args) -> float:
    """Peak resident MB of `python -m data.prepare <prepare_args>` run in a child process (Linux:
    /proc). A failure is a RuntimeError with the last line of its output."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = os.path.join(tmp, "peak_kb")
        r = subprocess.run([sys.executable, "-c", PREPARE_WITH_PEAK, peak_file, *prepare_args], cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode:
            last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"data.prepare failed (exit {r.returncode}): {last}")
        with open(peak_file) as f:
            return int(f.read()) / 1024


def prepare_peak_mb(doc_mb: float, tokenizer: str) -> tuple[float, float]:
    """(peak resident MB of `python -m data.prepare` on 20 one-line documents, the same with one
    more .txt document of doc_mb MB): their difference is what the large document costs."""
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        line = "the quick brown fox jumps over the lazy dog again and again\n"
        for i in range(20):                        # small documents, also for the val split
            with open(os.path.join(tmp, f"small{i}.txt"), "w") as f:
                f.write(line)
        for big in (False, True):
            if big:
                with open(os.path.join(tmp, "big.txt"), "w") as f:
                    f.write(line * int(doc_mb * 2**20 / len(line)))
            peaks.append(prepare_child_peak_mb(["--source", f"files:{tmp}/*.txt", "--tokenizer", tokenizer,
                                                "--workers", "1", "--val-fraction", "0.2",
                                                "--out", os.path.join(tmp, f"out{int(big)}"), "--quiet"]))
    return peaks[0], peaks[1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="train.py configs whose model the screen is timed on")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--vocab", type=positive_int, default=50257, help="model.vocab_size (default GPT-2's)")
    p.add_argument("--doc-mb", type=positive_float, default=None,
                   help="size of the one document data.prepare reads (default: not measured)")
    p.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "bytes"), help="data.prepare's --tokenizer")
    args = p.parse_args(argv)
    if not args.configs and not args.doc_mb:
        p.error("nothing to measure: give configs (the non-finite screen), --doc-mb (data.prepare's memory) or both")
    torch.set_num_threads(1)
    try:
        # every config read before anything is measured: a bad one costs no data.prepare run
        cfgs = [(path, load_config(path, [f"--model.vocab_size={args.vocab}"])) for path in args.configs]
        if args.doc_mb:
            base, peak = prepare_peak_mb(args.doc_mb, args.tokenizer)
            print(f"data.prepare ({args.tokenizer}, 1 worker): peak {base:.0f} MB on small documents, {peak:.0f} MB with one "
                  f"{args.doc_mb:g} MB document: {(peak - base) / args.doc_mb:.1f} MB per MB of it")
        for path, cfg in cfgs:
            try:
                n, screen, elementwise = screen_seconds(cfg, args.repeats)
            except ValueError as e:       # a model config.py accepts but cannot be built: which config
                raise ValueError(f"{path}: {e}") from e
            print(f"{os.path.basename(path)}: {n / 1e6:.0f}M parameters, non-finite screen {screen:.3f} s, "
                  f"isfinite(p).all() per parameter {elementwise:.3f} s")
    except (ValueError, OSError, RuntimeError) as e:
        return report_error(e)
    print(result_footer("checks_cpu.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
