"""The fused memory-layer kernels (kernels/triton_memory.py) against the torch path of
memory.py (the oracle, run in float64): outputs, final states (weights, chunk-start weights,
momenta) and the gradients of every input, on random data with T not a multiple of C.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): fp32, tiny sizes. With a GPU the same cases
run natively, plus a realistic size.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import (CUDA, DEVICE, fp32_matmul_precision, fused_vs_oracle_errors, needs_cuda,
                     stored_transposed, triton_kernels_or_skip)

needs_kernels = triton_kernels_or_skip()

from kernels import triton_memory  # noqa: E402
from memory import NeuralMemory  # noqa: E402
RULES = ("dgd", "gd", "momentum")


def make_memory(rule, H, d, C, seed=0):
    torch.manual_seed(seed)
    return NeuralMemory(H, d, depth=1, chunk_size=C, update_rule=rule, backend="triton").to(DEVICE)


def make_inputs(rule, B, T, H, d, seed=1):
    """Unit keys and queries (as Titans and HOPE feed them), gates in their ranges."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen)      # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen)        # noqa: E731
    inputs = {"q": F.normalize(randn(B, T, H, d), dim=-1), "k": F.normalize(randn(B, T, H, d), dim=-1),
              "v": randn(B, T, H, d), "lr": 0.5 * rand(B, T, H), "alpha": 0.6 + 0.4 * rand(B, T, H),
              "beta": 0.5 + 0.5 * rand(B, T, H) if rule == "momentum" else None}
    return {n: None if t is None else t.to(DEVICE) for n, t in inputs.items()}


def run_segments(mem, inputs, segments, dtype):
    """Feed the inputs in consecutive segments (lengths), carrying the state. Returns the
    leaf inputs, y and the final state."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in inputs}
    state, ys, lo = None, [], 0
    for length in segments:
        piece = {n: None if t is None else t[:, lo:lo + length] for n, t in args.items()}
        y, state = mem(piece["q"], piece["k"], piece["v"], piece["lr"], piece["alpha"],
                       piece["beta"], state)
        ys.append(y)
        lo += length
    return leaves, torch.cat(ys, 1), state


def outputs_of(y, state):
    outs = {"y": y, "weights": state["weights"][0], "chunk_start": state["chunk_start"][0]}
    if state["momenta"] is not None:
        outs["momenta"] = state["momenta"][0]
    return outs


# Gates at the ends of what the models produce (test_extreme_gates_match_torch_path), as
# values repeated along T: exactly 0 (Titans: alpha = 1 - sigmoid(.) is 0 in fp32 above a
# forget logit of ~17) and tiny but nonzero (sigmoid gates: 1e-6, 1e-20) among larger ones.
EXTREME_GATES = {"zero": [0.0, 1.0, 0.5, 0.0, 0.9], "tiny": [1e-6, 1.0, 1e-20, 0.7]}


def with_gates(inputs, values):
    """inputs with alpha = `values` repeated along T (and beta, if any, the same shifted by
    one token, so that both gates take every value)."""
    B, T, H = inputs["alpha"].shape
    alpha = torch.tensor(values).repeat(T // len(values) + 1)[:T].view(1, T, 1).expand(B, T, H)
    alpha = alpha.contiguous().to(inputs["alpha"].device)
    return {**inputs, "alpha": alpha,
            "beta": None if inputs["beta"] is None else alpha.roll(1, 1)}


def compare_with_torch_path(rule, B, T, H, d, C, segments=None, gates=None):
    """Relative errors (max |diff| / max(1, max |ref|)) of every output and every gradient
    (inputs and the meta-learned initial weights) for the loss sum <out, random cotangent>.
    gates: values for alpha (and beta) instead of random ones (`with_gates`)."""
    segments = segments or [T]
    inputs = make_inputs(rule, B, T, H, d)
    if gates is not None:
        inputs = with_gates(inputs, gates)
    return fused_vs_oracle_errors(make_memory(rule, H, d, C), inputs, segments,
                                  run_segments, outputs_of, ["init_weight"], DEVICE)


def assert_close(errors, tol, what):
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad}"


# (B, T, H, d, C): odd T, several chunks, a ragged last chunk, H = 2, d not a power of two
SMALL_CASES = [(1, 19, 1, 8, 4), (1, 5, 2, 16, 8), (1, 19, 2, 12, 8)]


@needs_kernels
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}-T{}-H{}-d{}-C{}".format(*c))
@pytest.mark.parametrize("rule", RULES)
def test_fused_layer_matches_torch_path(rule, case):
    assert_close(compare_with_torch_path(rule, *case), 2e-5, f"{rule} {case}")


@needs_kernels
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_every_autotuned_scan_width_matches_torch_path(rule, block, monkeypatch):
    """On a GPU the layer's sequential kernels pick their V-block width by timing
    (kernels.triton_delta.SCAN_CONFIGS); at d = 20 a width of 16 splits the state's columns
    into a full and a partial block, 32 leaves one partial block."""
    import triton
    for name in ("_mem_delta_fwd_kernel", "_mem_delta_bwd_scan_kernel",
                 "_mem_momentum_fwd_kernel", "_mem_momentum_bwd_scan_kernel"):
        monkeypatch.setattr(getattr(triton_memory, name), "configs",
                            [triton.Config({"BV": block}, num_warps=4)])
    assert_close(compare_with_torch_path(rule, 1, 19, 1, 20, 8), 2e-5, f"{rule} BV {block}")


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_segments_mid_chunk_match_one_call(rule):
    """Segments ending mid-chunk: the next call finishes the chunk on the torch path and the
    write point W_B (the kernel's returned chunk-start state) carries gradients across."""
    assert_close(compare_with_torch_path(rule, 1, 19, 1, 8, 4, segments=[6, 7, 6]), 2e-5, rule)


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_random_per_sequence_initial_state(rule):
    """Per-sequence initial weights (and momenta) that differ across batch and heads, as
    leaves: outputs, final states and their gradients vs the float64 torch path (the
    kernels' per-(batch, head) state offsets, and the gradient to the initial momenta; the
    other tests start from zero momenta and shared initial weights). The linear memory's port of
    test_triton_mlp_memory's test of that name. Kills a wrong dz0 (e.g. negated) in
    triton_memory._memory_momentum_backward (test_segments_mid_chunk_match_one_call, whose
    later segments start from carried momenta, sees that one too) and initial states read
    per head only (offset (bh % H) for bh), which B = 1 and shared initial weights hide."""
    B, T, H, d, C = 2, 11, 2, 8, 4
    fused = make_memory(rule, H, d, C)
    oracle = copy.deepcopy(fused).double()
    oracle.backend = "torch"
    inputs = make_inputs(rule, B, T, H, d)
    gen = torch.Generator().manual_seed(5)
    init = [(0.3 * torch.randn(B, H, d, d, generator=gen, dtype=torch.float64)).to(DEVICE)
            for _ in range(2 if rule == "momentum" else 1)]
    results = []
    for mem, dtype in ((oracle, torch.float64), (fused, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in init]
        x = {n: t.to(dtype).requires_grad_() for n, t in inputs.items() if t is not None}
        state = {"weights": leaves[:1], "chunk_start": leaves[:1], "momenta": leaves[1:] or None,
                 "pos": 0}
        y, state = mem(x["q"], x["k"], x["v"], x["lr"], x["alpha"], x.get("beta"), state)
        outs = outputs_of(y, state)
        cot = torch.Generator().manual_seed(6)
        loss = sum((o.double() * torch.randn(o.shape, generator=cot, dtype=torch.float64).to(DEVICE)).sum()
                   for o in outs.values())
        names = ["d" + n for n in x] + ["dW0", "dZ0"][:len(leaves)]
        results.append((outs, dict(zip(names, torch.autograd.grad(loss, list(x.values()) + leaves)))))
    (ref_out, ref_grads), (tri_out, tri_grads) = results
    assert ("dZ0" in tri_grads) == (rule == "momentum") and "dW0" in tri_grads
    err = lambda x, ref: ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()  # noqa: E731
    errors = {n: err(tri_out[n], ref_out[n]) for n in ref_out}
    errors.update({n: err(tri_grads[n], ref_grads[n]) for n in ref_grads})
    assert_close(errors, 2e-5, f"{rule} random initial state")


@needs_kernels
@pytest.mark.parametrize("gates", EXTREME_GATES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's numpy log(0)
def test_extreme_gates_match_torch_path(rule, gates):
    """Gates of exactly 0 and of 1e-6 / 1e-20 (EXTREME_GATES): every output and gradient,
    dalpha and dbeta included, within the usual tolerance of the float64 torch path. The
    kernels' gate gradient is d/dlog(gate) / gate (_gate_grad): it was NaN at a gate of 0,
    and off by up to 1e12 x at 1e-20 while d/dlog(gate) carried an absolute error. At a gate
    of 0 both paths give 0, the gradient of the clamped log (kernels/chunked.py)."""
    assert_close(compare_with_torch_path(rule, 1, 19, 1, 8, 4, gates=EXTREME_GATES[gates]), 2e-5,
                 f"{rule} {gates} gates")


@needs_kernels
def test_dispatch_uses_the_fused_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = triton_memory.fused_linear_memory_delta
    monkeypatch.setattr(triton_memory, "fused_linear_memory_delta",
                        lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs("dgd", 1, 5, 1, 8)
    args = [inputs[n] for n in ("q", "k", "v", "lr", "alpha")]
    make_memory("dgd", 1, 8, 4)(*args)
    assert len(calls) == 1
    for changes in (dict(backend="torch"), dict(depth=2), dict(max_grad_norm=1.0),
                    dict(detach_chunks_older_than=1)):
        options = {**dict(depth=1, chunk_size=4, update_rule="dgd", backend="triton"), **changes}
        NeuralMemory(1, 8, **options).to(DEVICE)(*args)
        assert len(calls) == 1, f"fused kernel used with {changes}"
    if not CUDA:   # "auto" keeps the CPU on the torch path
        NeuralMemory(1, 8, depth=1, chunk_size=4, update_rule="dgd")(*args)
        assert len(calls) == 1


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_detach_targets_on_the_fused_path(rule):
    """detach_targets, which does not keep a memory off the fused kernel, holds there too:
    the same outputs as without it and no outer gradient to the targets v (the torch path's
    behaviour, tests/test_memory.py::test_detach_targets_blocks_outer_gradient_through_v).
    Kills: memory._fused_scan handing the kernel v undetached."""
    x = make_inputs(rule, 1, 6, 1, 8)
    x["v"].requires_grad_()
    args = [x[n] for n in ("q", "k", "v", "lr", "alpha", "beta")]
    torch.manual_seed(0)
    detached = NeuralMemory(1, 8, depth=1, chunk_size=4, update_rule=rule, backend="triton",
                            detach_targets=True).to(DEVICE)
    assert detached._use_fused_kernel(x["q"])
    plain = make_memory(rule, 1, 8, 4)
    y_det, y_plain = detached(*args)[0], plain(*args)[0]
    torch.testing.assert_close(y_det, y_plain)
    assert torch.autograd.grad(y_plain.sum(), x["v"])[0].abs().max() > 0
    grad = torch.autograd.grad(y_det.sum(), x["v"], allow_unused=True)[0]
    assert grad is None or grad.abs().max() == 0


@needs_kernels
def test_no_grad_forward_matches_and_saves_no_chunk_states():
    mem = make_memory("momentum", 1, 8, 4)
    inputs = make_inputs("momentum", 1, 9, 1, 8)
    args = [inputs[n] for n in ("q", "k", "v", "lr", "alpha", "beta")]
    y_grad, state_grad = mem(*args)
    with torch.no_grad():
        y, state = mem(*args)
        out = triton_memory._memory_momentum_fwd(*[a.float() for a in args[:3]], args[4], args[5],
                                                 args[3], state["weights"][0], state["momenta"][0], 4, False)
    assert torch.equal(y, y_grad.detach()) and not y.requires_grad
    assert torch.equal(state["weights"][0], state_grad["weights"][0].detach())
    assert out[4].numel() == 0 and out[5].numel() == 0


@needs_kernels
@pytest.mark.parametrize("op", ("delta", "momentum"))
def test_custom_ops_pass_opcheck(op):
    """Schema, fake implementation, autograd registration: what torch.compile relies on."""
    inputs = make_inputs("momentum", 1, 5, 1, 8)
    gates = [inputs["alpha"], inputs["beta"], inputs["lr"]]
    states = [torch.randn(1, 1, 8, 8, device=DEVICE) for _ in range(2 if op == "momentum" else 1)]
    args = [t.requires_grad_() for t in [inputs["q"], inputs["k"], inputs["v"], *gates, *states]]
    custom_op = getattr(torch.ops.nested_learning, f"memory_linear_{op}_fwd").default
    torch.library.opcheck(custom_op, (*args, 4, True))


def _delta_args(**changes):
    args = {"q": torch.zeros(1, 4, 1, 8), "k": torch.zeros(1, 4, 1, 8), "v": torch.zeros(1, 4, 1, 8),
            "alpha": torch.ones(1, 4, 1), "eta": torch.zeros(1, 4, 1), "lr_write": torch.zeros(1, 4, 1),
            "initial_state": torch.zeros(1, 1, 8, 8), "chunk_size": 4}
    args.update(changes)
    return {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in args.items()}


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(1, 4, 8)), r"q must be \[B,T,H,d\]"),
    (dict(v=torch.zeros(1, 4, 1, 6)), r"v must be \[B,T,H,d\]"),
    (dict(eta=torch.zeros(1, 4)), r"eta must be \[B,T,H\]"),
    (dict(initial_state=torch.zeros(1, 1, 8, 4)), r"initial_state must be \[B,H,d,d\]"),
    (dict(q=torch.zeros(1, 4, 1, 8, dtype=torch.float64)), "q must be float32, bfloat16"),
    (dict(lr_write=0.1), "lr_write must be a torch.Tensor"),
    (dict(initial_state=None), "initial_state must be a torch.Tensor; got NoneType"),
    (dict(chunk_size=65), r"chunk_size must be an integer in \[1, 64\]"),
    (dict(q=torch.zeros(1, 4, 1, 80), k=torch.zeros(1, 4, 1, 80), v=torch.zeros(1, 4, 1, 80),
          initial_state=torch.zeros(1, 1, 80, 80), chunk_size=64), r"in \[1, 32\] .* head dim 80"),
    (dict(q=torch.zeros(1, 0, 1, 8), k=torch.zeros(1, 0, 1, 8), v=torch.zeros(1, 0, 1, 8),
          alpha=torch.zeros(1, 0, 1), eta=torch.zeros(1, 0, 1), lr_write=torch.zeros(1, 0, 1)),
     "needs T >= 1"),
])
def test_bad_inputs_raise_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message):
        triton_memory.fused_linear_memory_delta(**_delta_args(**change))


# ----------------------------------------------------------------------------- tf32 products

@needs_kernels
@pytest.mark.usefixtures("tensor_core_tf32")
@pytest.mark.slow
def test_tf32_products_carry_no_truncation_bias():
    """The momentum memory integrates its writes, so a bias in every tf32 product adds up over
    the chunks: with truncated operands (tensor_core_tf32) and slow gates the fused layer was
    0.06 off at 2K tokens here, outputs, states and gradients alike (0.12 at 4K on an H200:
    BENCHMARKS.md). triton_delta._dot rounds the operands to nearest first, which leaves
    unbiased errors: 4e-3 at most here."""
    inputs = make_inputs("momentum", 1, 2048, 2, 64)
    gen = torch.Generator().manual_seed(3)        # slow gates, as bench/kernels.py draws them
    inputs.update({n: (0.8 + 0.2 * torch.rand(1, 2048, 2, generator=gen)).to(DEVICE) for n in ("alpha", "beta")})
    with fp32_matmul_precision("high"):
        errors = fused_vs_oracle_errors(make_memory("momentum", 2, 64, 64), inputs, [2048], run_segments,
                                        outputs_of, ["init_weight"], DEVICE)
    assert_close(errors, 1e-2, "momentum, tf32")


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_matmul_precision_high_takes_tf32_products(rule):
    """fp32 matmul precision "high" (bf16 training, train.setup_precision) gives the fused
    layer tf32 products, "highest" exact ones (triton_delta.dot_precision): every output and
    gradient of the "high" run is measurably further from the float64 torch path (~4e-4 vs
    ~1e-7; the interpreter shows it because triton_delta._dot rounds the operands to tf32
    itself) and still within tf32's rounding of it. Kills launchers that pass PREC="ieee"
    whatever dot_precision says (triton_delta._launch_dims, triton_memory._launch_args),
    which test_tf32_products_carry_no_truncation_bias's upper bound cannot see."""
    errors = {}
    for setting in ("highest", "high"):
        with fp32_matmul_precision(setting):
            errors[setting] = compare_with_torch_path(rule, 1, 19, 1, 8, 4)
    assert_close(errors["high"], 1e-2, f"{rule}, tf32")
    exact = {n: f"{e:.1e} (highest: {errors['highest'][n]:.1e})" for n, e in errors["high"].items()
             if not e > 20 * errors["highest"][n]}
    assert not exact, f"{rule}: no tf32 rounding at matmul precision high: {exact}"


# ----------------------------------------------------------------------------- CUDA only

@needs_cuda
@pytest.mark.parametrize("rule", RULES)
def test_cuda_realistic_size_matches_torch_path(rule):
    """B=2, T=1000 (not a multiple of C), H=4, d=64, C=64: the Titans/HOPE operating point."""
    assert_close(compare_with_torch_path(rule, 2, 1000, 4, 64, 64), 1e-4, rule)


@needs_cuda
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_cuda_head_dim_128_chunk_16(rule):
    assert_close(compare_with_torch_path(rule, 1, 300, 2, 128, 16), 1e-4, rule)


@needs_kernels
@pytest.mark.slow
def test_kernel_bench_quick_mode_runs(capsys):
    """bench/kernels.py --quick at its smallest: every row measured, errors at fp32 level (exact
    products: --fp32-matmul-precision highest); --parts runs the parts in the order given."""
    from bench import kernels as bench
    before = torch.get_float32_matmul_precision()
    assert bench.main(["--quick", "--ops", "momentum_rule", "--T", "5", "--fp32-matmul-precision", "highest",
                       "--parts", "hope", "scans", "cms"]) == 0
    assert torch.get_float32_matmul_precision() == before      # its --fp32-matmul-precision is undone
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.startswith("momentum_rule ")]
    assert {(r[1], r[2]) for r in rows} == {(i, p) for i in ("torch", "triton", "reference")
                                            for p in ("fwd", "fwd+bwd")}
    assert all(float(r[8]) < 1e-5 for r in rows), rows
    hope = [line.split() for line in out if line.startswith("hope/stage1/C4 ")]   # part 4
    assert sorted((r[1], r[2]) for r in hope) == [(i, p) for i in ("torch", "triton") for p in ("fwd", "fwd+bwd")
                                                  ] + [("triton/all", "fwd+bwd")]
    assert all(float(r[8]) < 1e-5 for r in hope), hope
    first = {name: next(i for i, line in enumerate(out) if line.startswith(name))
             for name in ("hope/stage1/C4 ", "momentum_rule ", "cms/")}
    assert first["hope/stage1/C4 "] < first["momentum_rule "] < first["cms/"]
    assert not any(line.startswith("memory/") for line in out)           # only the parts named
    assert any("vs triton/all" in line for line in out)


@needs_kernels
def test_kernel_bench_mlp_momentum_rows_have_a_finite_error(capsys):
    """The deep momentum memory's bench rows at --quick's 37 tokens: its inputs diverged
    unclipped (float64 too: the error column was NaN and the run still passed); clipped at 1
    as the titans_* configs, the error is at fp32 level, and a non-finite one fails the run."""
    from bench import kernels as bench
    argv = ["--quick", "--parts", "memory", "--depths", "2", "--rules", "momentum", "--passes", "fwd",
            "--fp32-matmul-precision", "highest"]
    assert bench.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("memory/")]
    assert len(rows) == 2 and all(float(r[8]) < 1e-5 for r in rows), rows


@needs_kernels
@pytest.mark.slow
def test_kernel_bench_memory_rows_of_the_linear_memory(capsys):
    """bench/kernels.py --parts memory --depths 1: the linear memory's rows only, at fp32
    error, for both update rules; --rules picks them, --passes the forward and/or backward."""
    from bench import kernels as bench
    assert bench.main(["--quick", "--parts", "memory", "--depths", "1", "--fp32-matmul-precision", "highest"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("memory/")]
    assert sorted({(r[0], r[1]) for r in rows}) == [(f"memory/{rule}/C8", impl) for rule in ("dgd", "momentum")
                                                    for impl in ("torch", "triton")]
    assert all(float(r[8]) < 1e-5 for r in rows), rows
    # --rules: the memory parts' update rules, here one; --passes: here the forwards only
    assert bench.main(["--quick", "--parts", "memory", "--depths", "1", "--rules", "momentum", "--T", "5",
                       "--passes", "fwd", "--fp32-matmul-precision", "highest"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("memory/")]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("memory/momentum/C8", impl, "fwd")
                                                        for impl in ("torch", "triton")]


@needs_kernels
@pytest.mark.parametrize("op", ("delta", "momentum"))
def test_fake_implementations_match_strides_of_permuted_inputs(op):
    """The ops make their inputs contiguous, so every output is row-major whatever the
    inputs' strides: the fake implementations must say the same, the backward op's included.
    Permuted inputs, three chunks."""
    inputs = make_inputs("momentum", 1, 9, 2, 8)
    gates = [inputs["alpha"], inputs["beta"], inputs["lr"]]
    args = [stored_transposed(t) for t in [inputs["q"], inputs["k"], inputs["v"], *gates]]
    n_states = 2 if op == "momentum" else 1
    states = [stored_transposed(torch.randn(1, 2, 8, 8, device=DEVICE), (-1, -2))
              for _ in range(n_states)]
    fake_only = ("test_schema", "test_faketensor")
    fwd = getattr(torch.ops.nested_learning, f"memory_linear_{op}_fwd").default
    torch.library.opcheck(fwd, (*args, *states, 4, False), test_utils=fake_only)
    with torch.no_grad():
        out = fwd(*args, *states, 4, True)
    chunks = out[2 + n_states:]                       # h_chunks (and z_chunks)
    grads = [stored_transposed(torch.randn_like(out[0]))]
    grads += [stored_transposed(torch.randn_like(s), (-1, -2)) for s in out[1:2 + n_states]]
    bwd = getattr(torch.ops.nested_learning, f"memory_linear_{op}_bwd").default
    torch.library.opcheck(bwd, (*args, *chunks, *grads, 4), test_utils=fake_only)
