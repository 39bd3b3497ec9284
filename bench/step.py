"""Tokens/s, FLOP/s (MFU on a known GPU) and peak memory of one training step (forward +
backward + AdamW) for any config.

    python bench/step.py configs/quickstart.yaml --train.batch_size=8 --train.seq_len=256
    python bench/step.py configs/hope_tiny.yaml --steps 10 --device cuda
    python bench/step.py configs/hope_760m.yaml --distributed.activation_checkpointing=true

Uses synthetic random tokens (no data preparation, runs on a bare GPU image). Prints one
result line plus the command, machine and date, ready to paste into BENCHMARKS.md;
--profile-rows N then profiles one more step (time per model part, top N ops).
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import report_error, result_footer, split_overrides  # noqa: E402
from cli import OneLineArgumentParser, non_negative_int, positive_int, resolve_device  # noqa: E402
from config import load_config  # noqa: E402
from kernels.checks import triton_blocker  # noqa: E402


def device_type(device) -> str:
    """"cpu" or "cuda" for a device name ("cuda:0" included) or torch.device."""
    return torch.device(device).type


def make_train_step(model, opt, x, grad_accum=1, device="cpu", bf16=False, grad_clip=1.0):
    """A closure running one training step on the tokens x (B, T + 1), as train.py does:
    grad_accum micro-batches of forward (bf16 autocast when bf16) and backward of
    loss / grad_accum, the global gradient norm clipped at grad_clip (optim.grad_clip; 0: only
    measured, as train.py logs it), then opt.step() and zero_grad."""
    micro = x.shape[0] // grad_accum
    kind = device_type(device)         # autocast takes the device's type, not "cuda:0"

    def step():
        for m in range(grad_accum):
            xb = x[m * micro:(m + 1) * micro]
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                _, loss, _ = model(xb[:, :-1], xb[:, 1:])
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build_train_step(cfg, device="cpu", compile=False):
    """(model, step) for `cfg`: its model (seed 0) and optimiser (train.make_optimizer) on
    `device`, and step() = one training step (make_train_step) on a fixed batch of
    train.batch_size random sequences of train.seq_len + 1 tokens, with per-block activation
    checkpointing when distributed.activation_checkpointing is on and per-block compile when
    `compile` or train.compile is (as train.py). Sets model.vocab_size from the tokenizer
    when it is 0."""
    from distributed import apply_activation_checkpointing, apply_compile
    from model import build_model
    from train import make_optimizer, setup_precision
    t = cfg.train
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50257 if cfg.data.tokenizer == "gpt2" else 257
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if cfg.distributed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile or t.compile:
        apply_compile(model)
    opt = make_optimizer(model, cfg, device_type(device))
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), device=device)
    bf16 = setup_precision(t, device_type(device))     # as train.py: bf16 autocast, TF32 on CUDA
    return model, make_train_step(model, opt, x, t.grad_accum, device, bf16, cfg.optim.grad_clip)


def median_seconds(step, steps, warmup, device="cpu"):
    """Median wall seconds of `steps` calls of step() after `warmup` untimed ones (CUDA:
    `device` synchronised before and after each call; the current device's synchronize alone
    would time only the launches of a step on --device cuda:1)."""
    times, cuda = [], device_type(device) == "cuda"
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_step(cfg, steps=5, warmup=2, device="cpu", compile=False, built=None):
    """Median seconds per optimiser step, tokens/s and peak memory (bytes) for `cfg`;
    built = build_train_step's (model, step) when the caller built them already."""
    t = cfg.train
    model, step = built or build_train_step(cfg, device, compile)
    cuda = device_type(device) == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sec = median_seconds(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arch": cfg.model.arch, "params": model.num_params(), "sec_per_step": sec,
            "tokens_per_s": t.batch_size * t.seq_len / sec, "peak_mem_bytes": peak,
            "flops_per_token": model.flops_per_token(t.seq_len),
            "memory_flops_per_token": model.memory_flops_per_token(t.seq_len)}


def flops_report(r, device) -> str:
    """bench_step's result r in FLOPs, counted as train.py counts them for its MFU: the model's
    6N + attention per token (model.flops_per_token, PaLM appendix B), the rate that makes,
    and its MFU where train.PEAK_FLOPS knows the GPU (bf16 dense peak). The memories' and CMS
    levels' inner loops (model.memory_flops_per_token: writes, scans, reads), which 6N does
    not see, come apart, outside the MFU, as train.py logs them."""
    from train import PEAK_FLOPS, peak_flops
    peak = peak_flops(device)
    rate, memory_rate = (r["tokens_per_s"] * r[k] for k in ("flops_per_token", "memory_flops_per_token"))
    line = f"model FLOPs (6N + attention): {r['flops_per_token'] / 1e9:.3g} G/token, {rate / 1e12:.3g} TFLOP/s"
    line += (f", MFU {100 * rate / peak:.1f}%" if peak else
             f" (no MFU: train.PEAK_FLOPS knows {'/'.join(PEAK_FLOPS)} only)")
    if memory_rate:
        line += (f"; memory inner loops {r['memory_flops_per_token'] / 1e9:.3g} G/token more, "
                 f"{memory_rate / 1e12:.3g} TFLOP/s" + (f" (+{100 * memory_rate / peak:.1f}% of peak)" if peak else "")
                 + ", not in the MFU")
    return line


def label_forwards(model):
    """Wrap the forward of each block's mixer and ffn, HOPE's two stages and the LM head in
    profiler records, so a profile says which part of the model the time belongs to. The
    stages are wrapped where both paths pass (per-chunk and fused): stage 1 at
    `_projection_stage`, M_mem at its `scan`."""
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
            wrap_method(block.mixer, "_projection_stage", "forward: mixer stage 1 (projection memories)")
            wrap_method(block.mixer.memory, "scan", "forward: mixer stage 2 (M_mem)")
    wrap(model.head, "forward: LM head")


def profile_step(model, step, rows, device="cpu"):
    """One more step() under torch.profiler, its model's parts labelled (label_forwards) ->
    (the forward records, slowest first, the step's total self time, the table of the `rows`
    ops with the most self time). Times are the CPU's, or on CUDA the GPU's (kernel time),
    in microseconds; the records' are inclusive (children counted)."""
    from torch.profiler import ProfilerActivity
    label_forwards(model)
    cuda = device_type(device) == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    table = prof.key_averages()
    inclusive, self_time = ("device_time_total", "self_device_time_total") if cuda else \
        ("cpu_time_total", "self_cpu_time_total")
    parts = sorted((e for e in table if e.key.startswith("forward:")), key=lambda e: -getattr(e, inclusive))
    parts = [(e.key, getattr(e, inclusive), e.count) for e in parts]
    return parts, step_self_time(table, cuda), table.table(sort_by=self_time, row_limit=rows)


def step_self_time(events, cuda):
    """The profiled step's whole self time (microseconds) from its events (key_averages()):
    on CPU the sum of every event's self CPU time; on CUDA the sum of the GPU events' self
    time only (device_type CUDA, not the profiler's GPU-side user annotations), as torch's own
    table totals it. Kineto also counts a kernel's time as the self device time of the CPU op
    that launched it, so summing every event's self_device_time_total counts each kernel
    twice."""
    if not cuda:
        return sum(e.self_cpu_time_total for e in events)
    from torch.autograd import DeviceType
    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))


def print_profile(parts, total, ops, what):
    """profile_step's result, as bench/step.py and bench/hope_cpu.py print it."""
    print(f"\n{what}, forward time by part (incl. children; whole step self time {total / 1e3:.0f} ms):")
    for key, micros, count in parts:
        print(f"  {key:<60} {micros / 1e3:8.1f} ms  ({count} calls)")
    print(f"\n{what}, top ops by self time (forward + backward + AdamW):")
    print(ops)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [options] [config] [--section.key=value ...]")
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml",
                   help="a train.py config; --section.key=value overrides follow, as in train.py")
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA when present)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block, as --train.compile=true")
    p.add_argument("--profile-rows", type=non_negative_int, default=0,
                   help="after timing, profile one more step: forward time per model part and this many "
                        "top ops by self time (CUDA: GPU kernel time); 0 = no profile")
    own, overrides = split_overrides(argv)
    return _run(p.parse_args(own), overrides, argv)


def _run(args, overrides, argv):
    """main() after parsing: build, time (and profile) one training step; print the result."""
    try:    # --device cuda without CUDA, a bad config (ConfigError), a model it cannot build
        device = resolve_device(args.device)
        cfg = load_config(args.config, overrides)
        why = triton_blocker(cfg.model, device)
        if why:
            raise ValueError(why)
        built = build_train_step(cfg, device, args.compile)
    except ValueError as e:
        return report_error(e)
    r = bench_step(cfg, args.steps, args.warmup, device, args.compile, built)
    mem_kind = "peak CUDA allocated" if device_type(device) == "cuda" else "peak process RSS"
    ac = " (AC)" if cfg.distributed.activation_checkpointing else ""
    print(f"{r['arch']:>15} | {r['params'] / 1e6:8.2f}M params | batch {cfg.train.batch_size} x seq "
          f"{cfg.train.seq_len}{ac} | {r['sec_per_step'] * 1e3:9.1f} ms/step | {r['tokens_per_s']:10,.0f} tok/s | "
          f"{mem_kind} {r['peak_mem_bytes'] / 2**20:,.0f} MiB")
    print(f"{'':>15} | {flops_report(r, device)}")
    for line in built[0].kernel_report(device):       # which memory parts ran fused (model.kernels)
        print(f"{'':>15} | kernels: {line}")
    triton_delta = sys.modules.get("kernels.triton_delta")     # imported once a Triton kernel ran
    for line in triton_delta.tuned_configs() if triton_delta else ():   # a GPU's autotuned choices
        print(f"{'':>15} | autotuned: {line}")
    if args.profile_rows:
        print_profile(*profile_step(built[0], built[1], args.profile_rows, device), f"{r['arch']} step")
    print(result_footer("step.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
