"""Kernel benchmark (issue 5 item 5): the scan primitives and the fused memory layer.

    python bench/kernels.py                 # GPU: B=4, T in {2048,4096,8192}, H=16, d in {64,128}, bf16
    python bench/kernels.py --quick         # tiny sizes, fp32: a smoke test (CPU: the Triton interpreter,
                                            # several minutes on 2 cores; --parts scans for one part)
    python bench/kernels.py --T 4096 --d 64 --ops delta_rule --json out.json
    python bench/kernels.py --parts hope memory --T 4096 --d 64    # parts in this order only
    python bench/kernels.py --parts memory --depths 1 --fp32-matmul-precision highest   # linear memories, exact products
    python bench/kernels.py --parts memory --depths 1 --rules momentum --T 1000 4096     # one rule
    python bench/kernels.py --parts scans --ops delta_rule --passes fwd                  # forwards only
    python bench/kernels.py --parts budget --T 4096 --d 64                               # Titans' step budget
    python bench/kernels.py --parts hope --impls triton --no-errors    # the fused rows only, no float64 runs

Part 1, `kernels.delta_rule` and `kernels.momentum_rule`: forward and forward+backward time
of backend "torch" (chunked PyTorch) and "triton", of backend "reference" (the sequential
loop; only with --reference: it is slow) and of fla's `chunk_gated_delta_rule` when `fla`
imports. Error: max |x - ref| / max(1, max |ref|) over the outputs (o and the final states;
fwd+bwd: also every input's gradient) against a float64 reference = the chunked path run in
float64 on the same (rounded) inputs (tests/test_kernels.py checks it against the sequential
oracle). At d > 64 with tf32 products also as impl "triton/chunk64": chunks of 64 tokens
instead of 32 (kernels.triton_scans.WIDE_KEY_CHUNK; fla's chunk; with exact fp32 products
two kernels would overflow shared memory there). On a GPU the sequential scans pick their
V-block width and warps by timing (kernels.triton_delta.autotune_scan), the gradient kernels
their pipelining stages (autotune_grads); after each part the bench prints what they chose,
as `autotuned:` lines.

fla mapping (DESIGN §3.2 reparameterisation). fla's gated delta rule is
    S_t = S_{t-1} alpha_t (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = scale * S_t q_t
(fla keeps h = S^T [K, V] and takes g = log alpha). Ours, S_t = S_{t-1} (alpha_t I - eta_t k_t
k_t^T) + u_t k_t^T, is that with b_t = eta_t / alpha_t and v_t = u_t / b_t = u_t alpha_t /
eta_t, so we call chunk_gated_delta_rule(q, k, v=u*alpha/eta, g=log(alpha), beta=eta/alpha,
scale=1, initial_state=S_0^T, output_final_state=True). The bench keeps eta >= 0.05 so v
stays bounded; fla's error column checks the mapping on the GPU, tests/test_bench_fla.py on
CPU. fla need not be installed: `bash bench/fetch_fla.sh` unpacks it into .fla/site, and
`PYTHONPATH=.fla/site python bench/kernels.py ...` finds it (bench/gpu_check.sh does so).
Op delta_rule_ungated: delta_rule at alpha = 1 against fla's chunk_delta_rule, which has no
gate (beta = eta, v = u / eta). Our kernels compute their gates all the same, fla's ungated
kernels skip them, so our time over fla's there bounds the gated ratio from above; it is
measurable where fla refuses its gated backward (triton 3.4-3.7.0 on Hopper, fla #640).

Part 2, the memory layer (memory.NeuralMemory, linear, C=64; 32 at d=128, the fused limit): backend "torch" (per-chunk
PyTorch, the CPU path) vs "triton" (one fused kernel, kernels/triton_memory.py), for the DGD
and momentum rules, fp32 state; error of y and the final weights vs the float64 torch path.
fp32 products follow --fp32-matmul-precision: high (the default, as train.py sets for bf16
training on CUDA) = tf32 tensor cores, highest = exact fp32 (kernels.triton_delta.dot_precision).
Rows memory/mlp/*: the same for the 2-layer MLP memory (kernels/triton_mlp_memory.py), E = 2d
at d <= 64 (Titans' memories), E = d at d = 128 (the widest hidden the fused kernel holds; op
memory/mlp/x1/..., timed after part 3), at the largest chunk <= --mem-chunk the kernel takes
(max_mlp_chunk).

Part 3, a CMS fast level (cms.fast_level_scan, NL Eq. 71; op cms/fast_level/C16): the torch
per-chunk scan vs the fused Triton level (kernels/triton_cms.py), hidden = 4 d, fp32, lr 1e-3,
from a sequence start; error of y and the final fast weights vs the float64 torch scan.

Part 4, HOPE's stage 1 (op hope/stage1/C16): the projection memories of one layer (H heads
of width d, memory hidden d, C_other 16, as hope_760m), hope.py's per-chunk path vs one fused
launch (kernels/triton_hope.py), forward and forward+backward; forward+backward also as
impl "triton/all", the fused launch saving every chunk start (no recompute in the backward:
triton_mlp_memory.save_interval), so "vs triton/all" prices the recompute. The memories
clip their inner gradients at 1, as hope_760m: at HopeConfig's default 3 the stage amplifies
rounding along the sequence (fp32 and float64 runs part ~10x per 100-200 tokens; BENCHMARKS.md,
2026-11-27), and at T = 4096 both paths' errors were O(1).

Part 5, Titans' step budget (op budget/C64; memory.chunk_step_budget, our stabiliser, not
the papers': docs/FIDELITY.md Titans choice 14): its PyTorch loop over each chunk's tokens
(a few small kernels per token) vs the Triton loop (kernels/triton_budget.py), at chunk
--mem-chunk; error of the capped lr and the spent matrix (and the gradients) vs float64.

--impls picks the implementations timed (a name also selects its variants: triton/all with
triton); --no-errors skips the float64 references (the error column reads nan), which on CPU
at the GPU's shapes take minutes and most of the memory (bench/precompile.py runs the
fused rows so).

Times: CUDA: triton.testing.do_bench (median, after warm-up); CPU: median wall time.
"""
import contextlib
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():                 # the Triton kernels run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
import kernels  # noqa: E402
from bench.common import machine, report_error, timer, versions  # noqa: E402
from cli import OneLineArgumentParser, output_file_problem, positive_int, write_atomic  # noqa: E402
from kernels.triton_delta import dot_precision, tuned_configs  # noqa: E402
from memory import NeuralMemory  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("delta_rule", "momentum_rule", "delta_rule_ungated")    # the last: delta_rule at alpha = 1
PARTS = ("scans", "memory", "cms", "hope", "wide", "budget")     # main's default order (module docstring)


def load_fla():
    """({op: fla's kernel on our op's signature}, "") for the ops fla computes (delta_rule:
    chunk_gated_delta_rule; delta_rule_ungated: chunk_delta_rule), or ({}, why) when fla does
    not import."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return {"delta_rule": fla_delta_rule(chunk_gated_delta_rule),
                "delta_rule_ungated": fla_ungated_delta_rule(chunk_delta_rule)}, ""
    except Exception as e:        # ImportError, or a broken install (triton/torch mismatch)
        return {}, f"{type(e).__name__}: {e}".splitlines()[0][:120]


def scan_inputs(op, B, T, H, d, device, dtype, seed=0):
    """Unit-norm q, k; gates in (0.8, 1]; DGD step eta in [0.05, 0.5]; states ~ 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)    # noqa: E731
    gate = lambda: 0.8 + 0.2 * torch.rand(B, T, H, generator=g)                  # noqa: E731
    x = {"q": unit(), "k": unit(), "u": torch.randn(B, T, H, d, generator=g), "alpha": gate()}
    if op == "delta_rule_ungated":
        x["alpha"] = torch.ones_like(x["alpha"])
    if op != "momentum_rule":
        x["eta"] = 0.05 + 0.45 * torch.rand(B, T, H, generator=g)
        x["initial_state"] = 0.1 * torch.randn(B, H, d, d, generator=g)
    else:
        x["beta"] = gate()
        x["initial_state"] = 0.1 * torch.randn(B, H, d, d, generator=g)
        x["initial_momentum"] = 0.1 * torch.randn(B, H, d, d, generator=g)
    return {n: t.to(device=device, dtype=dtype) for n, t in x.items()}


def fla_delta_rule(fla_fn):
    """Our delta_rule signature on top of fla's gated delta rule (module docstring: the mapping)."""
    def run(q, k, u, alpha, eta, initial_state, chunk_size=64, backend=None):
        beta = eta / alpha
        v = u * (alpha / eta).unsqueeze(-1)
        g = torch.log(alpha.float())
        o, h_final = fla_fn(q, k, v, g, beta, scale=1.0,
                            initial_state=initial_state.float().transpose(-1, -2).contiguous(),
                            output_final_state=True)
        return o, h_final.transpose(-1, -2)
    return run


def fla_ungated_delta_rule(fla_fn):
    """Our delta_rule at alpha = 1 on top of fla's chunk_delta_rule (no gate): the mapping
    above with g = 0, beta = eta, v = u / eta; alpha is not read (run.unread, for measure)."""
    def run(q, k, u, alpha, eta, initial_state, chunk_size=64, backend=None):
        o, h_final = fla_fn(q, k, u / eta.unsqueeze(-1), eta, scale=1.0,
                            initial_state=initial_state.float().transpose(-1, -2).contiguous(),
                            output_final_state=True)
        return o, h_final.transpose(-1, -2)
    run.unread = ("alpha",)
    return run


def relative_error(xs, refs):
    """max over xs of |x - ref| / max(1, max |ref|); nan without references (--no-errors).
    An x of None (the gradient of an input fn does not read, measure) is skipped."""
    if refs is None:
        return float("nan")
    return max(((x.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()
                for x, r in zip(xs, refs) if x is not None)


def measure(fn, x, backward, device, repeats, cotangent_seed=1):
    """(seconds, outputs, grads) of fn(**x) [+ backward of sum <out, fixed random c>]. The
    inputs fn names in fn.unread get the gradient None: fla's ungated delta rule takes no
    alpha (op delta_rule_ungated), and autograd.grad refused the whole row for it. Any other
    input without a gradient still fails the row."""
    leaves = {n: t.detach().requires_grad_(backward) for n, t in x.items()}
    read = [n for n in leaves if n not in getattr(fn, "unread", ())]
    wrt = [leaves[n] for n in read]
    gen = torch.Generator().manual_seed(cotangent_seed)
    state = {}

    def once():
        with torch.set_grad_enabled(backward):
            outs = fn(**leaves)
            if backward:
                if "cot" not in state:
                    state["cot"] = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
                loss = sum((o.float() * c).sum() for o, c in zip(outs, state["cot"]))
                grads = dict(zip(read, torch.autograd.grad(loss, wrt)))
                state["grads"] = [grads.get(n) for n in leaves]
            state["outs"] = [o.detach() for o in outs]

    seconds = timer(once, device, repeats)
    return seconds, state["outs"], state.get("grads"), state.get("cot")


def add_row(args, rows, run, **where):
    """Time one implementation, run() -> (seconds, relative error), and record and print its
    row (where: part, op, impl, pass_, B, T, H, d), if --impls selects the implementation.
    One failing implementation must not end the bench: its row gets NaNs and the first line
    of its error."""
    if where["impl"].split("/")[0] not in args.impls:
        return
    try:
        sec, err = run()
        note = "" if math.isfinite(err) or not args.errors else "the error vs float64 is not finite"
    except Exception as e:
        sec, err, note = float("nan"), float("nan"), f"{type(e).__name__}: {e}".splitlines()[0][:80]
    rows.append(dict(**where, ms=sec * 1e3, rel_err=err, note=note))
    print_row(rows[-1])


def reference_outputs(args, fn, x):
    """fn's outputs on x in float64 without autograd: the error column's reference (None
    with --no-errors)."""
    if not args.errors:
        return None
    with torch.no_grad():
        return fn(**{n: t.double() for n, t in x.items()})


def reference_grads(fn, x, cot):
    leaves = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    outs = fn(**leaves)
    loss = sum((o * c.double()).sum() for o, c in zip(outs, cot))
    return [o.detach() for o in outs], torch.autograd.grad(loss, list(leaves.values()))


def bench_scans(args, device, dtype, fla_fns, rows):
    for op in args.ops:
        scan = "delta_rule" if op == "delta_rule_ungated" else op       # kernels.<scan>
        for d in args.d:
            for T in args.T:
                x = scan_inputs(op, args.B, T, args.H, d, device, dtype)
                impls = {"torch": "torch", "triton": "triton"}
                if args.reference:
                    impls["reference"] = "reference"
                fns = {name: (lambda b: lambda **kw: getattr(kernels, scan)(**kw, chunk_size=args.chunk, backend=b))(b)
                       for name, b in impls.items()}
                if op in fla_fns:
                    fns["fla"] = fla_fns[op]
                ref64 = lambda **kw: getattr(kernels, scan)(**kw, chunk_size=args.chunk, backend="torch")  # noqa: E731
                ref_outs = reference_outputs(args, ref64, x)
                ref = {}             # the float64 gradients, once: every run draws the same cotangent

                def run(fn, backward):
                    sec, outs, grads, cot = measure(fn, x, backward, device, args.repeats)
                    err = relative_error(outs, ref_outs)
                    if backward and args.errors:
                        ref.setdefault("grads", reference_grads(ref64, x, cot)[1])
                        err = max(err, relative_error(grads, ref["grads"]))
                    return sec, err
                # the chunk at K > 64 (triton_scans.WIDE_KEY_CHUNK), where it fits: tf32 products
                if d > 64 and dot_precision(dtype) == "tf32":
                    fns["triton/chunk64"] = fns["triton"]
                for backward in args.backward_passes:
                    for name, fn in fns.items():
                        chunk = 64 if name == "triton/chunk64" else None
                        with kernel_setting("triton_scans", "WIDE_KEY_CHUNK", chunk):
                            add_row(args, rows, lambda: run(fn, backward), part="scan", op=op, impl=name,
                                    pass_="fwd+bwd" if backward else "fwd", B=args.B, T=T, H=args.H, d=d)


def bench_memory_layer(args, device, rows, wide=False):
    """NeuralMemory, chunk C: backend torch (per-chunk scans) vs triton (fused layer), for the
    linear memory (kernels/triton_memory.py) and the 2-layer MLP memory
    (kernels/triton_mlp_memory.py) with E = 2d; wide: only the MLP memories whose fused
    kernel holds no more than E = d (d = 128; main runs them last, after the CMS level: their
    compiles are the longest). Each at the largest chunk <= --mem-chunk its kernel takes."""
    from kernels.triton_memory import max_chunk
    from kernels.triton_mlp_memory import fusable_mlp, max_mlp_chunk
    for depth in (d for d in args.depths if d == 2 or not wide):
        for rule in args.rules:
            for d in args.d:
                expansion = 2 if depth == 1 or fusable_mlp(d, 2, 1, rule) else 1
                if wide != (expansion == 1):
                    continue
                kind = "" if depth == 1 else "mlp/" if expansion == 2 else "mlp/x1/"
                C = min(args.mem_chunk, max_chunk(d) if depth == 1 else max_mlp_chunk(d, rule))
                if depth == 2 and not fusable_mlp(d, expansion, C, rule):
                    continue
                for T in args.T:
                    bench_memory_case(args, device, rows, depth, kind, rule, d, T, C, expansion)


def bench_memory_case(args, device, rows, depth, kind, rule, d, T, C, expansion):
    """One memory-layer shape: fwd and fwd+bwd of both backends; error of y and the final
    weights vs the float64 torch path."""
    torch.manual_seed(0)
    B, H = args.B, args.H
    g = torch.Generator().manual_seed(1)
    x = {"q": F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1),
         "k": F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1),
         "v": torch.randn(B, T, H, d, generator=g),
         "lr": 0.5 * torch.rand(B, T, H, generator=g),
         "alpha": 0.8 + 0.2 * torch.rand(B, T, H, generator=g)}
    if rule == "momentum":
        x["beta"] = 0.8 + 0.2 * torch.rand(B, T, H, generator=g)
    x = {n: t.to(device) for n, t in x.items()}
    # MLP memories clip each token's inner gradient at 1, as the titans_* configs do: unclipped,
    # the momentum MLP memory diverges on these inputs within 37 tokens (float64 too)
    options = dict(depth=depth, expansion=expansion, chunk_size=C, update_rule=rule,
                   max_grad_norm=1.0 if depth == 2 else None)
    mem = NeuralMemory(H, d, **options).to(device)
    oracle = NeuralMemory(H, d, backend="torch", **options).to(device).double()
    oracle.load_state_dict(mem.state_dict())

    def outputs(model):             # y and the final weights
        def layer(**kw):
            y, state = model(**kw)
            return (y, *state["weights"])
        return layer
    ref = reference_outputs(args, outputs(oracle), x)
    for impl in ("torch", "triton"):
        mem.backend = impl

        def run(backward):
            sec, outs, _, _ = measure(outputs(mem), x, backward, device, args.repeats)
            return sec, relative_error(outs, ref)
        for backward in args.backward_passes:
            add_row(args, rows, lambda: run(backward), part="memory", op=f"memory/{kind}{rule}/C{C}",
                    impl=impl, pass_="fwd+bwd" if backward else "fwd", B=B, T=T, H=H, d=d)


def bench_hope_stage1(args, device, rows):
    """HOPE's stage 1 (the projection memories, memory hidden = d, C_other <= 16, inner clip 1:
    hope_760m's layer at H heads of width d): hope.py's per-chunk path vs the fused launch
    (kernels/triton_hope.py), forward and forward+backward; error of k, v, eta, alpha (and of
    the gradient of x~) vs the float64 per-chunk path."""
    from config import HopeConfig, ModelConfig
    from hope import SelfModifyingTitans
    from kernels.triton_hope import fusable_projections
    C = args.hope_chunk
    for d in args.d:
        if not fusable_projections(d, 1, C):
            continue
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=args.H * d, n_head=args.H, kernels="triton",
                          hope=HopeConfig(chunk_other=C, chunk_mem=64, memory_expansion=1, max_grad_norm=1.0))
        mixer = SelfModifyingTitans(cfg).to(device)
        oracle = SelfModifyingTitans(cfg).to(device).double()   # beside the outputs it checks
        oracle.load_state_dict(mixer.state_dict())
        oracle.projections.backend = "torch"

        def stage(model, B):
            def outputs(x):
                outs = model._projection_stage(x, model.projections.initial_state(B), 0)[:5]
                return [t for t in outs if t is not None]
            return outputs
        for T in args.T:
            g = torch.Generator().manual_seed(3)
            x = {"x": torch.nn.functional.silu(torch.randn(args.B, T, args.H, d, generator=g)).to(device)}  # x~
            ref = reference_outputs(args, stage(oracle, args.B), x)
            ref_grads = {}       # once: both implementations draw the same cotangent

            def run(impl, backward):
                mixer.projections.backend = impl.split("/")[0]
                with kernel_setting("triton_mlp_memory", "MAX_SAVED_CHUNKS",
                                    float("inf") if impl == "triton/all" else None):
                    sec, outs, grads, cot = measure(stage(mixer, args.B), x, backward, device,
                                                    args.repeats)
                err = relative_error(outs, ref)
                if backward and args.errors:
                    ref_grads.setdefault("x", reference_grads(stage(oracle, args.B), x, cot)[1])
                    err = max(err, relative_error(grads, ref_grads["x"]))
                return sec, err
            for backward in args.backward_passes:
                for impl in ("torch", "triton") + (("triton/all",) if backward else ()):
                    add_row(args, rows, lambda: run(impl, backward), part="hope", op=f"hope/stage1/C{C}",
                            impl=impl, pass_="fwd+bwd" if backward else "fwd", B=args.B, T=T,
                            H=args.H, d=d)


@contextlib.contextmanager
def kernel_setting(module, name, value):
    """Within: kernels.<module>.<name> = value, restored after (value None: unchanged). The
    variants the bench prices: triton_scans.WIDE_KEY_CHUNK (impl triton/chunk64: the scans'
    chunk at K > 64) and triton_mlp_memory.MAX_SAVED_CHUNKS (impl
    triton/all, inf: the fused forwards save every chunk start, so their backwards recompute
    nothing)."""
    import importlib
    target = importlib.import_module(f"kernels.{module}")
    before = getattr(target, name)
    if value is not None:
        setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, before)


def bench_step_budget(args, device, rows):
    """Titans' step budget (memory.chunk_step_budget, budget 0.5, chunk --mem-chunk): the
    PyTorch loop over each chunk's tokens vs the Triton loop (kernels/triton_budget.py);
    error of the capped lr and the spent matrix (and of the gradients of the keys, lr and
    keep) vs the float64 loop. Keys from 3 directions plus noise, so the budget binds."""
    from memory import chunk_step_budget
    C = min(args.mem_chunk, kernels.checks.MAX_BUDGET_CHUNK)
    for d in args.d:
        for T in args.T:
            g = torch.Generator().manual_seed(4)
            basis = torch.randn(3, args.H, d, generator=g)
            noise = 0.3 * torch.randn(args.B, T, args.H, d, generator=g)
            x = {"k": F.normalize(basis[torch.randint(0, 3, (args.B, T), generator=g)] + noise, dim=-1),
                 "lr": 0.6 * torch.rand(args.B, T, args.H, generator=g),
                 "keep": 0.2 + 0.8 * torch.rand(args.B, T, args.H, generator=g)}
            x = {n: t.to(device) for n, t in x.items()}

            def capped(impl):
                def fn(k, lr, keep):
                    return [t for t in chunk_step_budget(k, lr, keep, None, 0, C, 0.5, impl) if t is not None]
                return fn
            ref = reference_outputs(args, capped("torch"), x)
            ref_grads = {}
            for impl in ("torch", "triton"):
                def run(backward):
                    sec, outs, grads, cot = measure(capped(impl), x, backward, device, args.repeats)
                    err = relative_error(outs, ref)
                    if backward and args.errors:
                        ref_grads.setdefault("g", reference_grads(capped("torch"), x, cot)[1])
                        err = max(err, relative_error(grads, ref_grads["g"]))
                    return sec, err
                for backward in args.backward_passes:
                    add_row(args, rows, lambda: run(backward), part="budget", op=f"budget/C{C}", impl=impl,
                            pass_="fwd+bwd" if backward else "fwd", B=args.B, T=T, H=args.H, d=d)


def bench_cms_level(args, device, rows):
    """One CMS fast level (model dim d, hidden 4 d, chunk C): fast_level_scan (torch, per
    chunk) vs triton_cms.fused_fast_level (one launch per pass)."""
    from cms import fast_level_scan
    from kernels import triton_cms
    for d in args.d:
        for T in args.T:
            B, hidden = args.B, 4 * d
            C = min(args.cms_chunk, triton_cms.max_cms_chunk(d))
            g = torch.Generator().manual_seed(2)
            a = torch.randn(B, T, d, generator=g)                      # unit RMS, like RMSNorm's output
            x = {"a": a, "target": a @ torch.randn(d, d, generator=g) / d ** 0.5,
                 "w_in": torch.randn(B, hidden, d, generator=g) / d ** 0.5,
                 "w_out": torch.randn(B, d, hidden, generator=g) / hidden ** 0.5}
            x = {n: t.to(device) for n, t in x.items()}
            ref = reference_outputs(args, lambda a, target, w_in, w_out: fast_level_scan(
                a, target, w_in, w_out, None, None, 0, C, 1e-3)[:3], x)
            for impl, scan in (("torch", fast_level_scan), ("triton", triton_cms.fused_fast_level)):
                def level(a, target, w_in, w_out):
                    return scan(a, target, w_in, w_out, None, None, 0, C, 1e-3)[:3]
                def run(backward):
                    sec, outs, _, _ = measure(level, x, backward, device, args.repeats)
                    return sec, relative_error(outs, ref)
                for backward in args.backward_passes:
                    add_row(args, rows, lambda: run(backward), part="cms", op=f"cms/fast_level/C{C}",
                            impl=impl, pass_="fwd+bwd" if backward else "fwd", B=B, T=T, H=1, d=d)


HEADER = f"{'op':<28}{'impl':<16}{'pass':<9}{'B':>3}{'T':>6}{'H':>4}{'d':>5}{'ms':>11}{'rel err':>10}  note"


def print_row(r):
    print(f"{r['op']:<28}{r['impl']:<16}{r['pass_']:<9}{r['B']:>3}{r['T']:>6}{r['H']:>4}{r['d']:>5}"
          f"{r['ms']:>11.3f}{r['rel_err']:>10.1e}  {r['note']}", flush=True)


def print_speedups(rows):
    """Per (op, shape, pass): triton vs torch, and triton vs fla where measured."""
    print("\nspeedups (time of the other / time of triton):")
    key = lambda r: (r["op"], r["T"], r["d"], r["pass_"])      # noqa: E731
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["impl"]] = r["ms"]
    for (op, T, d, p), t in by.items():
        if "triton" in t and t["triton"] == t["triton"]:
            parts = [f"vs {o} {t[o] / t['triton']:.2f}x" for o in ("torch", "fla", "reference", "triton/all",
                                                                   "triton/chunk64")
                     if o in t]
            print(f"  {op:<28}T={T:<6}d={d:<4}{p:<8} " + ", ".join(parts))


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 sizes (a smoke test; CPU ok)")
    p.add_argument("--B", type=positive_int, default=4)
    p.add_argument("--T", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--H", type=positive_int, default=16)
    p.add_argument("--d", type=positive_int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="the scans' inputs (part scans; the other parts run fp32)")
    p.add_argument("--chunk", type=positive_int, default=64, help="scan chunk_size")
    p.add_argument("--mem-chunk", type=positive_int, default=64, help="memory layer chunk C")
    p.add_argument("--cms-chunk", type=positive_int, default=16, help="CMS fast level chunk C")
    p.add_argument("--hope-chunk", type=positive_int, default=16, help="HOPE stage 1's C_other (<= 16)")
    p.add_argument("--depths", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                   help="the memory parts' memories: 1 = linear, 2 = MLP")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--rules", nargs="+", choices=("dgd", "momentum"), default=["dgd", "momentum"],
                   help="the memory parts' update rules")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="the parts to run, in this order")
    p.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"],
                   help="time the forward, forward+backward, or both")
    p.add_argument("--reference", action="store_true", help="also time the sequential reference")
    p.add_argument("--impls", nargs="+", choices=("torch", "triton", "reference", "fla"),
                   default=["torch", "triton", "reference", "fla"],
                   help="implementations to time (reference: with --reference; fla: where it imports)")
    p.add_argument("--no-errors", dest="errors", action="store_false",
                   help="skip the float64 references (error column nan)")
    p.add_argument("--repeats", type=positive_int, default=3, help="CPU timing repeats")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--fp32-matmul-precision", choices=("highest", "high"), default="high",
                   help="torch.set_float32_matmul_precision for the run: the fp32 memory-layer and "
                        "CMS kernels multiply in exact fp32 at highest, in tf32 at high (training)")
    args = p.parse_args(argv)
    args.backward_passes = [pass_ == "fwd+bwd" for pass_ in dict.fromkeys(args.passes)]
    if args.hope_chunk > 16:     # the fused stage-1 launch's limit: not silently timed at 16 instead
        p.error(f"argument --hope-chunk: must be <= 16, got {args.hope_chunk}")
    problem = args.json and output_file_problem(args.json)    # before the benchmark, not after it
    if problem:
        p.error(f"argument --json: {args.json} {problem}")
    previous = torch.get_float32_matmul_precision()      # a process setting: restored on return
    torch.set_float32_matmul_precision(args.fp32_matmul_precision)
    try:
        return _run(p, args, argv)
    finally:
        torch.set_float32_matmul_precision(previous)


def _run(p, args, argv):
    """main() after parsing: the benchmark rows, printed (and written to --json)."""
    if args.quick:        # tiny sizes for the options left at their defaults
        quick = dict(B=1, T=[37], H=2, d=[16], dtype="fp32", chunk=16, mem_chunk=8, cms_chunk=4, hope_chunk=4,
                     reference=True, repeats=1)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    # only the scans take --dtype: on CPU `--parts memory` needs no --dtype fp32
    if device == "cpu" and dtype != torch.float32 and kernels.checks.interpreting() and "scans" in args.parts:
        p.error(f"--dtype {args.dtype} needs a GPU (the Triton interpreter computes 16-bit wrongly); use --dtype fp32")
    fla_fns, fla_why = load_fla()
    name = machine() + ("" if device == "cuda" else " (Triton interpreter)")
    command = f"python bench/kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    print(f"command: {command}")
    print(f"device: {name}; {versions()}; date {datetime.date.today().isoformat()}; "
          f"scans' dtype {args.dtype}; fp32 matmul precision {args.fp32_matmul_precision}; "
          f"fla: {'yes' if fla_fns else 'not available (' + fla_why + ')'}")
    print(HEADER)
    rows = []
    run_part = {"scans": lambda: bench_scans(args, device, dtype, fla_fns, rows),
                "memory": lambda: bench_memory_layer(args, device, rows),
                "cms": lambda: bench_cms_level(args, device, rows),
                "hope": lambda: bench_hope_stage1(args, device, rows),
                "wide": lambda: bench_memory_layer(args, device, rows, wide=True),
                "budget": lambda: bench_step_budget(args, device, rows)}
    printed = set()
    for part in args.parts:
        run_part[part]()
        for line in tuned_configs():        # on a GPU: what the autotuned kernels chose
            if line not in printed:
                print(f"autotuned: {line}")
                printed.add(line)
    if not rows:            # e.g. --impls reference without --reference: not a passed run
        return report_error(f"nothing was timed: --impls {' '.join(args.impls)} has no rows in --parts "
                            f"{' '.join(args.parts)} at these shapes (reference: with --reference; fla: where it "
                            "imports; both in part scans only)")
    print_speedups(rows)
    if args.json:
        try:
            # what the header prints: the rows alone do not say their dtype, precision or release
            write_atomic(args.json, json.dumps({"command": command, "device": name, "versions": versions(),
                                                "date": datetime.date.today().isoformat(), "scans_dtype": args.dtype,
                                                "fp32_matmul_precision": args.fp32_matmul_precision,
                                                "rows": rows}, indent=1))
        except OSError as e:       # the path was checked first; it changed during the run
            return report_error(f"cannot write --json {args.json}: {e.strerror or e}")
    # NaN time: add_row caught its error; a NaN / inf error column: wrong or diverged outputs
    failed = [r for r in rows if r["ms"] != r["ms"] or (args.errors and not math.isfinite(r["rel_err"]))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
