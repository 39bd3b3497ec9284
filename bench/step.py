"""Tokens/s and peak memory of one training step (forward + backward + AdamW) for any config.

    python bench/step.py configs/quickstart.yaml --train.batch_size=8 --train.seq_len=256
    python bench/step.py configs/hope_tiny.yaml --steps 10 --device cuda

Uses synthetic random tokens (no data preparation, runs on a bare GPU image). Prints one
result line plus the command, machine and date, ready to paste into BENCHMARKS.md.
"""
import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import ConfigError, load_config  # noqa: E402


def positive_int(text):
    """argparse type for sizes and counts: an int >= 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def add_model_shape_args(p, d_model: int, n_layer: int, n_head: int, vocab: int):
    """--d-model, --n-layer, --n-head and --vocab (positive ints, these defaults) for the
    benchmarks that build their models from a shape."""
    p.add_argument("--d-model", type=positive_int, default=d_model)
    p.add_argument("--n-layer", type=positive_int, default=n_layer)
    p.add_argument("--n-head", type=positive_int, default=n_head)
    p.add_argument("--vocab", type=positive_int, default=vocab, help="vocabulary size (50257 = GPT-2, 257 = bytes)")


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def bench_step(cfg, steps=5, warmup=2, device="cpu", compile=False):
    """Median seconds per optimiser step, tokens/s and peak memory (bytes) for `cfg`."""
    from model import build_model
    from train import make_optimizer
    t = cfg.train
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50257 if cfg.data.tokenizer == "gpt2" else 257
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = make_optimizer(model, cfg, device)
    step_model = torch.compile(model) if compile else model
    use_bf16 = device == "cuda" and t.dtype != "float32"
    micro = t.batch_size // t.grad_accum
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for m in range(t.grad_accum):
            xb = x[m * micro:(m + 1) * micro]
            with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
                _, loss, _ = step_model(xb[:, :-1], xb[:, 1:])
            (loss / t.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arch": cfg.model.arch, "params": model.num_params(), "sec_per_step": sec,
            "tokens_per_s": t.batch_size * t.seq_len / sec, "peak_mem_bytes": peak,
            "flops_per_token": model.flops_per_token(t.seq_len)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true")
    args, overrides = p.parse_known_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = bench_step(cfg, args.steps, args.warmup, device, args.compile)
    mem_kind = "peak CUDA allocated" if device == "cuda" else "peak process RSS"
    print(f"{r['arch']:>15} | {r['params'] / 1e6:8.2f}M params | batch {cfg.train.batch_size} x seq "
          f"{cfg.train.seq_len} | {r['sec_per_step'] * 1e3:9.1f} ms/step | {r['tokens_per_s']:10,.0f} tok/s | "
          f"{mem_kind} {r['peak_mem_bytes'] / 2**20:,.0f} MiB")
    print(f"command: python bench/step.py {' '.join(argv)}\nmachine: {machine()}\n"
          f"date: {datetime.date.today().isoformat()}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
