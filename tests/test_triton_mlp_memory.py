"""The fused MLP memory-layer kernels (kernels/triton_mlp_memory.py) against the torch path
of memory.py (the oracle, run in float64): outputs, final states (both layers' weights and
chunk-start weights) and the gradients of every input (q, k, v, lr, alpha and both
meta-learned initial weights), on random data with T not a multiple of C.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): fp32, tiny sizes. With a GPU the same cases
run natively, plus a realistic size.
"""
import copy
import functools

import pytest
import torch

from helpers import (CUDA, DEVICE, fp32_matmul_precision, fused_vs_oracle_errors, needs_cuda,
                     stored_transposed, triton_kernels_or_skip)

needs_kernels = triton_kernels_or_skip()

from kernels import triton_mlp_memory  # noqa: E402
from memory import NeuralMemory  # noqa: E402
from test_triton_memory import (EXTREME_GATES, assert_close, make_inputs, run_segments,  # noqa: E402
                                with_gates)


def make_memory(rule, H, d, expansion, C, activation="silu", seed=0, **options):
    torch.manual_seed(seed)
    return NeuralMemory(H, d, depth=2, expansion=expansion, activation=activation, chunk_size=C,
                        update_rule=rule, backend="triton", **options).to(DEVICE)


def outputs_of(y, state):
    outs = {"y": y, "w_in": state["weights"][0], "w_out": state["weights"][1],
            "w_in_start": state["chunk_start"][0], "w_out_start": state["chunk_start"][1]}
    if state["momenta"] is not None:
        outs.update(z_in=state["momenta"][0], z_out=state["momenta"][1])
    return outs


def compare_with_torch_path(rule, B, T, H, d, expansion, C, activation="silu", segments=None,
                            self_target=False, gates=None, **options):
    """Relative errors (max |diff| / max(1, max |ref|)) of every output and every gradient
    for the loss sum <out, random cotangent>, fused (fp32) vs the torch path (float64).
    self_target: both run memory.scan(self_target=True) (HOPE's M_B(v) targets). gates:
    values for alpha (and beta) instead of random ones (test_triton_memory.with_gates)."""
    segments = segments or [T]
    run = run_segments if not self_target else (
        lambda mem, *args: run_segments(functools.partial(mem, self_target=True), *args))
    inputs = make_inputs(rule, B, T, H, d)
    if gates is not None:
        inputs = with_gates(inputs, gates)
    errors = fused_vs_oracle_errors(make_memory(rule, H, d, expansion, C, activation, **options),
                                    inputs, segments, run, outputs_of,
                                    ["init_w_in", "init_w_out"], DEVICE)
    assert set(errors) >= {"dq", "dk", "dv", "dlr", "dalpha", "dinit_w_in", "dinit_w_out"}
    assert rule != "momentum" or {"dbeta", "z_in", "z_out"} <= set(errors)
    return errors


# (B, T, H, d, expansion, C, activation): several chunks with a ragged last one, H = 2,
# B = 2, d and E = expansion * d not powers of two, both activations; a chunk tile taller
# than d and E (BT = 32 > BD = BE = 16: the backward's scratch slots are sized by BT)
SMALL_CASES = [(1, 21, 2, 16, 2, 8, "silu"), (1, 21, 2, 16, 2, 8, "gelu"),
               (2, 11, 1, 12, 3, 4, "silu"), (1, 37, 1, 8, 2, 32, "silu")]


@needs_kernels
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}-T{}-H{}-d{}-x{}-C{}-{}".format(*c))
@pytest.mark.parametrize("rule", triton_mlp_memory.FUSED_RULES)
@pytest.mark.slow
def test_fused_mlp_layer_matches_torch_path(rule, case):
    assert_close(compare_with_torch_path(rule, *case), 2e-5, f"{rule} {case}")


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_wide_head_matches_torch_path(rule):
    """A head wider than 64 (d = E = 72: [128, 128] tiles, the scratch slots sized by BD = BE,
    not BT) with self-generated targets for DGD (HOPE's memories at head dim 128)."""
    options = dict(self_target=True) if rule == "dgd" else {}
    assert_close(compare_with_torch_path(rule, 1, 11, 1, 72, 1, 8, **options), 2e-5,
                 f"{rule} d=72")


@needs_kernels
@pytest.mark.parametrize("gates", EXTREME_GATES)
@pytest.mark.parametrize("rule", triton_mlp_memory.FUSED_RULES)
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's numpy log(0)
def test_extreme_gates_match_torch_path(rule, gates):
    """Gates of exactly 0 and of 1e-6 / 1e-20 (test_triton_memory.EXTREME_GATES): every
    output and gradient, dalpha and dbeta included, within the usual tolerance of the
    float64 torch path; GD with self-generated targets (HOPE's memories, whose alpha is a
    sigmoid). The kernels' gate gradient is d/dlog(gate) / gate (_gate_grad): it was NaN at
    a gate of 0 and off by up to 1e12 x at 1e-20; at 0 both paths give 0 (the clamped log's
    gradient, kernels/chunked.py)."""
    options = dict(self_target=True) if rule == "gd" else {}
    assert_close(compare_with_torch_path(rule, 1, 21, 1, 8, 2, 8, gates=EXTREME_GATES[gates],
                                         **options), 2e-5, f"{rule} {gates} gates")


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_segments_mid_chunk_match_one_call(rule):
    """Segments ending mid-chunk: the next call finishes the chunk on the torch path from the
    kernel's returned chunk-start weights (and momenta), whose gradients carry across calls."""
    assert_close(compare_with_torch_path(rule, 1, 19, 1, 8, 2, 4, segments=[6, 7, 6]), 2e-5,
                 f"{rule} segments")


@needs_kernels
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
def test_random_per_sequence_initial_state(rule):
    """Per-sequence initial weights (and momenta) that differ across batch and heads, as
    leaves: outputs, final states and their gradients vs the torch path (the kernels'
    per-(batch, head) state offsets, and the gradient to the initial momenta)."""
    B, T, H, d, E, C = 2, 11, 2, 8, 16, 4
    fused = make_memory(rule, H, d, E // d, C)
    oracle = copy.deepcopy(fused).double()
    oracle.backend = "torch"
    inputs = make_inputs(rule, B, T, H, d)
    gen = torch.Generator().manual_seed(5)
    shapes = [(B, H, E, d), (B, H, d, E)] * (2 if rule == "momentum" else 1)
    init = [(0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(DEVICE) for s in shapes]
    results = []
    for mem, dtype in ((oracle, torch.float64), (fused, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in init]
        x = {n: t.to(dtype).requires_grad_() for n, t in inputs.items() if t is not None}
        state = {"weights": leaves[:2], "chunk_start": leaves[:2],
                 "momenta": leaves[2:] or None, "pos": 0}
        y, state = mem(x["q"], x["k"], x["v"], x["lr"], x["alpha"], x.get("beta"), state)
        outs = outputs_of(y, state)
        cot = torch.Generator().manual_seed(6)
        loss = sum((o.double() * torch.randn(o.shape, generator=cot, dtype=torch.float64).to(DEVICE)).sum()
                   for o in outs.values())
        results.append((outs, torch.autograd.grad(loss, list(x.values()) + leaves)))
    (ref_out, ref_grads), (tri_out, tri_grads) = results
    err = lambda x, ref: ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()  # noqa: E731
    errors = {n: err(tri_out[n], ref_out[n]) for n in ref_out}
    errors.update({f"grad{i}": err(t, r) for i, (t, r) in enumerate(zip(tri_grads, ref_grads))})
    assert len(tri_grads) == (10 if rule == "momentum" else 7)
    assert_close(errors, 2e-5, f"{rule} random initial state")


def clipped_fraction(rule, B, T, H, d, expansion, C, tau):
    """Fraction of the first chunk's tokens whose inner gradient norm exceeds tau."""
    mem = make_memory(rule, H, d, expansion, C).double()
    inputs = {n: t.double() for n, t in make_inputs(rule, B, T, H, d).items() if t is not None}
    a, g = mem._inputs_and_gradients(mem.initial_state(B)["weights"], inputs["k"][:, :C],
                                     inputs["v"][:, :C])
    norms = sum(x.pow(2).sum(-1) * y.pow(2).sum(-1) for x, y in zip(a, g)).sqrt()
    return (norms > tau).double().mean().item()


@needs_kernels
@pytest.mark.parametrize("rule", triton_mlp_memory.FUSED_RULES)
def test_inner_gradient_clip_matches_torch_path(rule):
    """max_grad_norm (memory.py's per-token clip, both layers together) inside the kernels,
    at a tau that clips some of the tokens and not others (both branches of the gradient)."""
    tau = 7.5
    assert 0.2 < clipped_fraction(rule, 1, 21, 2, 16, 2, 8, tau) < 0.8
    assert_close(compare_with_torch_path(rule, 1, 21, 2, 16, 2, 8, max_grad_norm=tau), 2e-5,
                 f"{rule} clip")


@needs_kernels
@pytest.mark.parametrize("rule, case, segments, options", [
    ("dgd", (1, 21, 2, 16, 2, 8, "silu"), None, {}),
    ("gd", (2, 11, 1, 12, 3, 4, "gelu"), None, {}),
    ("dgd", (1, 19, 1, 8, 2, 4, "silu"), [6, 7, 6], {}),
    ("dgd", (1, 21, 2, 16, 2, 8, "gelu"), None, dict(max_grad_norm=7.5)),
], ids=["dgd", "gd-gelu", "dgd-segments", "dgd-clip"])
@pytest.mark.slow
def test_self_target_matches_torch_path(monkeypatch, rule, case, segments, options):
    """HOPE's self-generated target (NL Eq. 87): fused_mlp_memory_delta(self_target=True)
    against memory.py's per-chunk path, which per chunk piece reads the target
    M_B(v) = mem.read(chunk_start, v) and writes toward it (update_piece), in float64:
    outputs, states and the gradients of q, k, v, lr, alpha and both initial weights, T not a
    multiple of C, and segments ending mid-chunk (memory.py's dispatch: the kernel must be
    called, with self_target)."""
    real_fused = triton_mlp_memory.fused_mlp_memory_delta
    calls = []
    monkeypatch.setattr(triton_mlp_memory, "fused_mlp_memory_delta",
                        lambda *a, **kw: calls.append(kw.get("self_target")) or real_fused(*a, **kw))
    errors = compare_with_torch_path(rule, *case, segments=segments, self_target=True, **options)
    assert calls and all(calls), f"the fused kernel ran without self_target: {calls}"
    assert_close(errors, 2e-5, f"{rule} {case} self_target")


@needs_kernels
def test_dispatch_uses_the_fused_kernel_only_where_it_applies(monkeypatch):
    calls = []
    for name in ("fused_mlp_memory_delta", "fused_mlp_memory_momentum"):
        real = getattr(triton_mlp_memory, name)
        monkeypatch.setattr(triton_mlp_memory, name,
                            lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    inputs = make_inputs("momentum", 1, 5, 1, 8)
    args = [inputs[n] for n in ("q", "k", "v", "lr", "alpha")]
    for rule in triton_mlp_memory.FUSED_RULES:
        make_memory(rule, 1, 8, 2, 4)(*args, inputs["beta"] if rule == "momentum" else None)
    assert len(calls) == 3
    for changes in (dict(backend="torch"), dict(detach_chunks_older_than=1), dict(chunk_size=65)):
        options = {**dict(depth=2, expansion=2, chunk_size=4, update_rule="dgd", backend="triton"),
                   **changes}
        NeuralMemory(1, 8, **options).to(DEVICE)(*args)
        assert len(calls) == 3, f"fused MLP kernel used with {changes}"
    # E = 256 > 128 (not run: the per-chunk Triton scans hold at most 128 either)
    assert not NeuralMemory(1, 8, depth=2, expansion=32, update_rule="dgd",
                            backend="triton")._use_fused_kernel(args[0])
    if not CUDA:   # "auto" keeps the CPU on the torch path
        NeuralMemory(1, 8, depth=2, chunk_size=4, update_rule="dgd")(*args)
        assert len(calls) == 3


def test_fusable_mlp_limits():
    fusable = triton_mlp_memory.fusable_mlp
    assert fusable(64, 2, 64, "dgd")             # Titans 760M's memory
    assert fusable(64, 1, 64, "dgd")             # HOPE 760M's M_mem
    assert fusable(64, 2, 64, "momentum")
    assert fusable(32, 2, 64, "dgd")
    assert fusable(64, 2, 16, "dgd")
    assert fusable(16, 4, 1, "gd")
    assert fusable(128, 1, 32, "dgd") and fusable(128, 1, 32, "gd")     # the widest head
    assert fusable(96, 1, 32, "dgd") and fusable(128, 1, 16, "momentum")
    assert not fusable(128, 1, 33, "dgd")        # C > 32 at d > 64
    assert not fusable(72, 1, 17, "momentum")    # C > 16 for momentum at d > 64
    assert not fusable(128, 2, 16, "dgd")        # E = 256 > 128
    assert not fusable(256, 1, 16, "dgd")        # d > 128
    assert not fusable(64, 4, 16, "dgd")         # E > 128
    assert not fusable(64, 2, 65, "dgd")         # C > 64
    assert fusable(64, 2, 16, "momentum")
    assert not fusable(64, 2, 16, "sgd")
    assert [triton_mlp_memory.max_mlp_chunk(d, rule) for d, rule in
            ((64, "dgd"), (64, "momentum"), (65, "gd"), (128, "dgd"), (128, "momentum"))] == [64, 64, 32, 32, 16]


def _kernel_args(B=1, T=5, H=1, d=8, E=16, seed=0):
    inputs = make_inputs("dgd", B, T, H, d, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    w_in = (torch.randn(B, H, E, d, generator=gen) * d ** -0.5).to(DEVICE)
    w_out = (torch.randn(B, H, d, E, generator=gen) * E ** -0.5).to(DEVICE)
    return [inputs["q"], inputs["k"], inputs["v"], inputs["alpha"], inputs["lr"], w_in, w_out]


@needs_kernels
def test_no_grad_forward_matches_and_saves_no_chunk_states():
    args = _kernel_args()
    leaves = [a.clone().requires_grad_() for a in args]
    y_grad, w_grad, b_grad = triton_mlp_memory.fused_mlp_memory_delta(*leaves, 4)
    with torch.no_grad():
        y, w, b = triton_mlp_memory.fused_mlp_memory_delta(*args, 4)
        out = triton_mlp_memory._memory_mlp_fwd(*args, 4, True, "silu", None, False, 0)
    assert torch.equal(y, y_grad.detach()) and not y.requires_grad
    assert all(torch.equal(x, r.detach()) for x, r in zip(w + b, w_grad + b_grad))
    assert out[5].numel() == 0 and out[6].numel() == 0


@needs_kernels
def test_backward_without_saved_states_raises_one_line():
    args = [t.clone().requires_grad_() for t in _kernel_args()]
    y = torch.ops.nested_learning.memory_mlp_delta_fwd(*args, 4, True, "silu", None, False, 0)[0]
    with pytest.raises(RuntimeError, match="fused_mlp_memory_delta: backward through a forward"):
        y.sum().backward()


def _momentum_args(T=5):
    q, k, v, alpha, lr, w_in, w_out = _kernel_args(T=T)
    beta = torch.rand(alpha.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return [q, k, v, alpha, beta, lr, w_in, w_out, 0.1 * w_in.flip(2), 0.1 * w_out.flip(3)]


@needs_kernels
@pytest.mark.parametrize("save_every", (1, 2))
@pytest.mark.parametrize("op", ("delta", "momentum"))
@pytest.mark.slow
def test_custom_ops_pass_opcheck(op, save_every):
    """Schema, fake implementation, autograd registration: what torch.compile relies on (with
    save_every 2, the backward's per-block recompute too)."""
    T = 5 if save_every == 1 else 9
    if op == "delta":
        args, options = _kernel_args(T=T), (4, True, "gelu", 2.0, True, save_every)
    else:
        args, options = _momentum_args(T=T), (4, "silu", None, save_every)
    custom_op = getattr(torch.ops.nested_learning, f"memory_mlp_{op}_fwd").default
    torch.library.opcheck(custom_op, (*[t.clone().requires_grad_() for t in args], *options))


@needs_kernels
@pytest.mark.parametrize("state_every, blocks", [
    (2, [(16, 23), (8, 16), (0, 8)]),      # T = 23, C = 4: 6 chunks, the last ragged
    (4, [(16, 23), (0, 16)]),              # a short last block
])
@pytest.mark.parametrize("rule", ("dgd", "momentum"))
@pytest.mark.slow
def test_recomputed_chunk_starts_match_saving_every_chunk(monkeypatch, rule, state_every, blocks):
    """state_every R > 1 (save_interval): the forward keeps every R-th chunk start and the
    backward re-runs each block of R chunks from its saved start, last block first. Outputs
    and the gradients of every input equal those of R = 1 (which the tests above check
    against the torch path), DGD with self-targets and the clip, momentum with the clip."""
    seen, real = [], triton_mlp_memory.backward_in_blocks

    def spy(T, C, every, seq_grads, carried, start_grads, step):
        return real(T, C, every, seq_grads, carried, start_grads,
                    lambda i_s, t0, t1, *grads: seen.append((t0, t1)) or step(i_s, t0, t1, *grads))

    monkeypatch.setattr(triton_mlp_memory, "backward_in_blocks", spy)
    if rule == "dgd":
        fn, args, options = triton_mlp_memory.fused_mlp_memory_delta, _kernel_args(T=23), dict(
            self_target=True, max_grad_norm=1.0)
    else:
        fn, args, options = triton_mlp_memory.fused_mlp_memory_momentum, _momentum_args(T=23), dict(
            max_grad_norm=1.0)

    def run(every):
        leaves = [a.clone().requires_grad_() for a in args]
        y, *pairs = fn(*leaves, 4, state_every=every, **options)
        outs = [y] + [t for pair in pairs for t in pair]
        gen = torch.Generator().manual_seed(4)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(DEVICE)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, leaves))

    saved_all = run(1)
    assert not seen
    recomputed = run(state_every)
    assert seen == blocks
    for a, b in zip(recomputed, saved_all):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_interval_policy_and_bad_state_every():
    """Every chunk start up to 16 chunks, ceil(sqrt(NT)) above; state_every checked."""
    assert [triton_mlp_memory.save_interval(n) for n in (1, 16, 17, 64, 256, 257)] == [1, 1, 5, 8, 16, 17]
    assert triton_mlp_memory.reverse_blocks(10, 4, 2) == [(1, 8, 10), (0, 0, 8)]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="state_every must be None or a positive int"):
            triton_mlp_memory.fused_mlp_memory_delta(*_kernel_args(), 4, state_every=bad)


@pytest.mark.parametrize("index, value, message", [
    (0, torch.zeros(1, 5, 8), r"q must be \[B,T,H,d\]"),
    (2, torch.zeros(1, 5, 1, 6), r"v must be \[B,T,H,d\]"),
    (4, torch.zeros(1, 5), r"lr must be \[B,T,H\]"),
    (5, torch.zeros(1, 1, 16, 4), r"w_in must be \[B,H,E,d\]"),
    (6, torch.zeros(1, 1, 8, 12), r"w_out must be \[B,H,d,E\] = \[1, 1, 8, 16\]"),
    (0, torch.zeros(1, 5, 1, 8, dtype=torch.float64), "q must be float32, bfloat16"),
    (3, 0.9, "alpha must be a torch.Tensor"),
    (5, torch.zeros(1, 1, 256, 8), r"hidden 256 exceed"),
    (5, torch.zeros(1, 1, 16, 8, dtype=torch.float64), "w_in must be float32, bfloat16 or float16"),
    (6, 0.5, "w_out must be a torch.Tensor"),
])
def test_bad_inputs_raise_one_line_errors(index, value, message):
    args = _kernel_args()
    args[index] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    if index == 5 and value.shape[2] == 256:
        args[6] = torch.zeros(1, 1, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_mlp_memory.fused_mlp_memory_delta(*args, 4)


def test_chunk_cap_of_wide_heads_raises_one_line():
    """At d > 64 the kernels take C <= 32 (DGD / GD) and C <= 16 (momentum): max_mlp_chunk."""
    q, k, v, alpha, lr, w_in, w_out = _kernel_args(d=72, E=72)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 32\] for the "
                                          r"fused MLP memory kernels \(DGD / GD\) at key head dim 72"):
        triton_mlp_memory.fused_mlp_memory_delta(q, k, v, alpha, lr, w_in, w_out, 33)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 16\] for the "
                                          r"fused MLP memory kernels \(momentum\)"):
        triton_mlp_memory.fused_mlp_memory_momentum(q, k, v, alpha, alpha, lr, w_in, w_out,
                                                    w_in, w_out, 17)


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=65), r"chunk_size must be an integer in \[1, 64\]"),
    (dict(chunk_size=True), r"chunk_size must be an int"),
    (dict(chunk_size=4, activation="relu"), "activation must be one of"),
    (dict(chunk_size=4, max_grad_norm=0.0), "max_grad_norm must be None or a finite number > 0"),
])
def test_bad_options_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        triton_mlp_memory.fused_mlp_memory_delta(*_kernel_args(), **kwargs)


def test_empty_sequence_raises():
    args = _kernel_args()
    args[:5] = [t[:, :0] for t in args[:5]]
    with pytest.raises(ValueError, match="needs T >= 1"):
        triton_mlp_memory.fused_mlp_memory_delta(*args, 4)


# ----------------------------------------------------------------------------- CUDA only

# The paper configs' memories at T = 1000 (not a multiple of C), with the fp32 products in
# tf32 as bf16 training runs them (train.setup_precision): Titans-760M's (d=64, E=128, C=64,
# momentum, clip 10; unclipped its momentum run overflows to inf even in float64) and
# HOPE-760M's M_mem (d=64, E=64, C=64, DGD, its own targets M_B(v), clip 3); then the widest
# head the kernels take, d = E = 128 (a HOPE memory at head dim 128), at its largest chunks
# (max_mlp_chunk), whose ids start "wide" (bench/gpu_check.sh runs them after the throughput
# runs). Exact fp32 products at the paper tiles take ptxas over 20 minutes per kernel
# (BENCHMARKS.md); the exact path runs natively in the small cases above.
# id: (rule, B, T, H, d, expansion, C, options)
CUDA_SHAPES = {
    "titans-momentum": ("momentum", 2, 1000, 4, 64, 2, 64, dict(max_grad_norm=10.0)),
    "titans-dgd": ("dgd", 2, 1000, 4, 64, 2, 64, dict(max_grad_norm=10.0)),
    "hope-mem-self-target": ("dgd", 2, 1000, 4, 64, 1, 64, dict(max_grad_norm=3.0, self_target=True)),
    "wide-dgd-self-target": ("dgd", 2, 500, 2, 128, 1, 32, dict(max_grad_norm=3.0, self_target=True)),
    "wide-momentum": ("momentum", 2, 500, 2, 128, 1, 16, dict(max_grad_norm=10.0)),
}


# The momentum memory at these gates (lr up to 0.5, beta up to 1) amplifies a change of its
# products ~500x into its gradients: exact fp32 products leave 5e-5 on Titans' shape, unbiased
# tf32 ones 0.13-0.21 on dk, dv, dlr, dalpha and dbeta (the interpreter, products rounded as
# triton_delta._dot does). Its outputs and states stay within 1.2e-2, and there the bias of
# truncated tf32 operands shows: 6.4e-2 before _dot rounded them. So for momentum the
# gradients are held to 0.5 (a wrong or NaN gradient is still caught), the rest to 2e-2.
MOMENTUM_TF32_GRAD_TOL = 0.5


def assert_outputs_and_grads(errors, grad_tol, label):
    """Outputs and states (no "d" prefix) within 2e-2, gradients within grad_tol."""
    assert_close({n: e for n, e in errors.items() if not n.startswith("d")}, 2e-2, label)
    assert_close({n: e for n, e in errors.items() if n.startswith("d")}, grad_tol, label)


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_shapes_match_torch_path_in_tf32(shape):
    rule, *case, options = CUDA_SHAPES[shape]
    with fp32_matmul_precision("high"):
        errors = compare_with_torch_path(rule, *case, **options)
    assert_outputs_and_grads(errors, MOMENTUM_TF32_GRAD_TOL if rule == "momentum" else 2e-2, shape)


@needs_kernels
@pytest.mark.usefixtures("tensor_core_tf32")
def test_tf32_momentum_outputs_carry_no_truncation_bias():
    """Titans' MLP momentum memory (d 64, E 128, C 64, clip 10) at T = 1000 in tf32, with the
    products as tensor cores make them (conftest.tensor_core_tf32): outputs and
    states within 2e-2 (9e-3 at most here; 6.9e-2 before triton_delta._dot rounded the
    operands). Its gradients: MOMENTUM_TF32_GRAD_TOL."""
    with fp32_matmul_precision("high"):
        errors = compare_with_torch_path("momentum", 1, 1000, 1, 64, 2, 64, max_grad_norm=10.0)
    assert_outputs_and_grads(errors, MOMENTUM_TF32_GRAD_TOL, "momentum, tf32")


@needs_cuda
def test_cuda_gelu_mid_chunk_segments_in_tf32():
    with fp32_matmul_precision("high"):
        errors = compare_with_torch_path("dgd", 1, 300, 2, 32, 4, 16, "gelu", segments=[37, 200, 63])
    assert_close(errors, 2e-2, "gelu")


@needs_kernels
@pytest.mark.parametrize("op", ("delta", "momentum"))
def test_fake_implementations_match_strides_of_permuted_inputs(op):
    """The ops make their inputs contiguous, so every output is row-major whatever the
    inputs' strides: the fake implementations must say the same, the backward op's included.
    Permuted inputs, three chunks."""
    if op == "delta":
        args, options, n_states = _kernel_args(T=9), (4, True, "silu", None, False), 4
    else:
        args, options, n_states = _momentum_args(T=9), (4, "silu", None), 6
    args = [stored_transposed(t) for t in args]
    fake_only = ("test_schema", "test_faketensor")
    fwd = getattr(torch.ops.nested_learning, f"memory_mlp_{op}_fwd").default
    torch.library.opcheck(fwd, (*args, *options, 0), test_utils=fake_only)
    with torch.no_grad():
        out = fwd(*args, *options, 1)
    chunks = out[1 + n_states:]
    grads = [stored_transposed(torch.randn_like(out[0]))]
    grads += [stored_transposed(torch.randn_like(s), (-1, -2)) for s in out[1:1 + n_states]]
    gates = 2 if op == "delta" else 3
    bwd = getattr(torch.ops.nested_learning, f"memory_mlp_{op}_bwd").default
    torch.library.opcheck(bwd, (*args[:3 + gates], *chunks, *grads, *options),
                          test_utils=fake_only)


@needs_kernels
@pytest.mark.parametrize("rule", ("momentum", "dgd"))
def test_hidden_width_over_the_scans_limit_runs_per_chunk(rule, monkeypatch):
    """hidden 144 > kernels.checks.MAX_KEY_DIM: fused_kernel_blocker reports the per-chunk
    path, and that path runs (layer 1 in the Triton scans, layer 2, key dim 144, in the
    chunked PyTorch scan) and matches backend "torch"."""
    from kernels import triton_scans
    calls = []
    for name in ("delta_rule_triton", "momentum_rule_triton"):
        real = getattr(triton_scans, name)
        monkeypatch.setattr(triton_scans, name,
                            lambda *a, _real=real, **kw: calls.append(a[1].shape[-1]) or _real(*a, **kw))
    inputs = make_inputs(rule, 1, 6, 1, 16)
    outs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        mem = NeuralMemory(1, 16, depth=2, expansion=9, chunk_size=4, update_rule=rule,
                           backend=backend).to(DEVICE)
        if backend == "triton":
            assert "fusable_mlp" in mem.fused_kernel_blocker(DEVICE)
        outs[backend] = mem(inputs["q"], inputs["k"], inputs["v"], inputs["lr"], inputs["alpha"],
                            inputs["beta"])
    assert calls and set(calls) == {16}
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    for w, r in zip(outs["triton"][1]["weights"], outs["torch"][1]["weights"]):
        torch.testing.assert_close(w, r, rtol=1e-4, atol=1e-4)
