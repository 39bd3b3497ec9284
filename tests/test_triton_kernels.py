"""The Triton scan kernels (kernels/triton_scans.py) against the float64 sequential reference.

Without a GPU the kernels run in Triton's interpreter on CPU: TRITON_INTERPRET=1 must be set
before triton is first imported (tests/conftest.py does it; so does
helpers.triton_kernels_or_skip), the interpreter computes bf16 wrongly, so those runs are fp32
and tiny. With a GPU the same small cases run natively, plus realistic sizes in fp32 and bf16,
a 16K-token run and torch.compile.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from helpers import DEVICE, fp32_matmul_precision, needs_cuda, stored_transposed, triton_kernels_or_skip

needs_kernels = triton_kernels_or_skip()

import kernels  # noqa: E402
from kernels import triton_scans  # noqa: E402
from kernels.reference import delta_rule_reference, momentum_rule_reference  # noqa: E402
from kernels.triton_delta import _launch_dims, _round_to_tf32  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

OPS = {  # name -> (Triton function, reference, second gate, initial-state args, outputs)
    "delta": (triton_scans.delta_rule_triton, delta_rule_reference, "eta",
              ("initial_state",), ("o", "S_T")),
    "momentum": (triton_scans.momentum_rule_triton, momentum_rule_reference, "beta",
                 ("initial_state", "initial_momentum"), ("o", "S_T", "Z_T")),
}


@triton.jit
def _round_to_tf32_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _round_to_tf32(tl.load(x_ptr + i)))


@needs_kernels
def test_round_to_tf32_takes_the_nearest_tf32_value():
    """triton_delta._round_to_tf32 (the operands of every tf32 product, triton_delta._dot):
    of the two tf32 values around x (10 mantissa bits), the nearer one, ties away from zero
    (as cvt.rna.tf32.f32), for both signs, zeros, subnormals, exact ties, values that round
    up into the next binade or to infinity, infinities and NaN."""
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([1.0, 1.0 + 2 ** -10, 3.0, 2.0 ** 127 * (2 - 2 ** -10)])      # tf32 values
    special = torch.cat([grid + grid * 2 ** -11, -(grid + grid * 2 ** -11),          # exact ties
                         torch.tensor([0.0, -0.0, 1e-40, -3e-39, 2 - 2 ** -12, 3.4e38, -3.4e38,
                                       float("inf"), -float("inf"), float("nan")])])
    x = torch.cat([special, torch.randn(1024 - len(special), generator=gen) *
                   10.0 ** torch.randint(-30, 30, (1024 - len(special),), generator=gen)])
    y = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x.to(DEVICE), y := y.to(DEVICE), N=1024)
    bits = x.numpy().view(np.uint32)
    xs = x.numpy().astype(np.float64)
    finite = np.isfinite(xs)
    kept = np.where(finite, bits & np.uint32(0xFFFFE000), 0).astype(np.uint32)
    down = kept.view(np.float32).astype(np.float64)                                # toward zero
    up = (kept + np.uint32(0x2000)).view(np.float32).astype(np.float64)           # away from it
    up_at = np.where(np.isinf(up), np.sign(xs) * 2.0 ** 128, up)     # past the largest: overflow
    expected = np.where(finite, np.where(np.abs(xs - down) < np.abs(up_at - xs), down, up), xs)
    np.testing.assert_array_equal(y.cpu().numpy().astype(np.float64), expected)
    assert torch.equal(torch.signbit(y.cpu()[:len(special)]), torch.signbit(x[:len(special)]))


def make_inputs(op, B, T, H, K, V, with_states, gates="typical", dtype=torch.float32, seed=0):
    """Random inputs in the kernels' operating range: unit keys (so the delta rule is a
    contraction), 0 < alpha, beta <= 1, 0 <= eta < 1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)          # noqa: E731
    randn = lambda *shape: torch.randn(*shape, generator=gen)        # noqa: E731
    lowest_gate = {"typical": 0.5, "strong_decay": 1e-3}[gates]
    inputs = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, H, K), dim=-1),
              "u": randn(B, T, H, V), "alpha": lowest_gate + (1 - lowest_gate) * rand(B, T, H)}
    if op == "delta":
        inputs["eta"] = rand(B, T, H)
    else:
        inputs["beta"] = lowest_gate + (1 - lowest_gate) * rand(B, T, H)
    for name in OPS[op][3]:
        inputs[name] = randn(B, H, V, K) if with_states else None
    return {n: None if t is None else t.to(DEVICE, dtype) for n, t in inputs.items()}


def run_op(op, fn, inputs, **kwargs):
    _, _, gate, state_names, _ = OPS[op]
    args = [inputs[n] for n in ("q", "k", "u", "alpha", gate)]
    return fn(*args, **{n: inputs[n] for n in state_names}, **kwargs)


def relative_error(x, ref):
    """max |x - ref| over max(1, max |ref|): one tolerance for outputs and gradients alike."""
    if ref.numel() == 0:
        return 0.0
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def compare_with_reference(op, inputs, chunk_size, loss_on="all"):
    """Outputs and gradients of every input, Triton vs the float64 reference, for the loss
    sum_i <out_i, c_i> with random cotangents c_i (loss_on="o": the output o only)."""
    fn, reference, _, _, out_names = OPS[op]
    given = {n: t for n, t in inputs.items() if t is not None}
    ref_in = {n: t.detach().double().requires_grad_() for n, t in given.items()}
    tri_in = {n: t.detach().clone().requires_grad_() for n, t in given.items()}
    ref_out = run_op(op, reference, {**inputs, **ref_in})
    tri_out = run_op(op, fn, {**inputs, **tri_in}, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.device)
                  for r in ref_out]
    used = len(out_names) if loss_on == "all" else 1
    ref_grads = torch.autograd.grad(
        sum((r * c).sum() for r, c in zip(ref_out[:used], cotangents)), list(ref_in.values()))
    tri_grads = torch.autograd.grad(
        sum((t.double() * c).sum() for t, c in zip(tri_out[:used], cotangents)),
        list(tri_in.values()))
    errors = {n: relative_error(t, r) for n, t, r in zip(out_names, tri_out, ref_out)}
    errors.update({"d" + n: relative_error(t, r)
                   for n, t, r in zip(ref_in, tri_grads, ref_grads)})
    dtypes_ok = (tri_out[0].dtype == inputs["q"].dtype
                 and all(s.dtype == torch.float32 for s in tri_out[1:])
                 and all(g.dtype == tri_in[n].dtype for n, g in zip(tri_in, tri_grads)))
    return errors, dtypes_ok


def assert_close(errors, tol, what):
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad}"


# Small cases: run in the interpreter on CPU (fp32) or natively on a GPU.
# (B, T, H, K, V, chunk_size, with initial states, gates)
SMALL_CASES = [
    (1, 19, 1, 16, 16, 16, True, "typical"),        # two chunks, ragged tail
    (2, 5, 2, 12, 20, 16, False, "typical"),        # K, V not powers of two; one short chunk
    (1, 1, 1, 16, 16, 8, True, "typical"),          # a single token; chunk 8 runs as 16
    (1, 37, 1, 16, 16, 32, True, "strong_decay"),   # gates down to 1e-3: log-space ratios
    (1, 19, 1, 16, 80, 16, True, "typical"),        # V = 80: two V-blocks of 64 columns
    (2, 37, 2, 16, 16, 16, True, "typical"),        # B = H = 2, 3 chunks: per-(b, h) chunk states
]


def small_id(case):
    B, T, H, K, V, C, states, gates = case
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-C{C}-{'S0' if states else 'noS0'}-{gates}"


@needs_kernels
@pytest.mark.parametrize("case", SMALL_CASES, ids=small_id)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference_small(op, case):
    """Outputs, states and every gradient vs the float64 reference (SMALL_CASES). The
    B = H = 2 case kills per-(batch, head) chunk-state offsets that ignore the batch-head
    index (bh * NT + i_t written bh + i_t in triton_delta / triton_momentum), which every
    case with B = H = 1 passes."""
    B, T, H, K, V, C, states, gates = case
    errors, dtypes_ok = compare_with_reference(
        op, make_inputs(op, B, T, H, K, V, states, gates), C)
    assert dtypes_ok, "o must come back in q's dtype, states in fp32, gradients in inputs' dtypes"
    assert_close(errors, 1e-4, f"{op} {small_id(case)}")


@needs_kernels
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("op", OPS)
def test_every_autotuned_scan_width_matches_reference(op, block, monkeypatch):
    """On a GPU the sequential scans pick their V-block width by timing
    (kernels.triton_delta.SCAN_CONFIGS); each width gives the reference's outputs and
    gradients, at V = 80 (a partial last block at every width) and with initial states."""
    from kernels import triton_delta, triton_momentum
    for kernel in (triton_delta._delta_fwd_scan_kernel, triton_delta._delta_bwd_scan_kernel,
                   triton_momentum._momentum_fwd_scan_kernel,
                   triton_momentum._momentum_bwd_scan_kernel):
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BV": block}, num_warps=4)])
    errors, _ = compare_with_reference(op, make_inputs(op, 1, 19, 1, 16, 80, True), 16)
    assert_close(errors, 1e-4, f"{op} BV {block}")


def test_every_autotuned_kernel_is_tuned_per_product_precision():
    """On a GPU a config chosen under tf32 products may not launch with exact fp32 ones at the
    same shape (more shared memory: KNOWN_SMEM_OVERFLOW), and a test or bench can switch
    torch's matmul precision within one process: so the product precision PREC is in both
    autotuning keys, and every autotuned kernel takes it (triton.autotune silently skips a
    key that is not one of the kernel's arguments, and the interpreter tunes nothing)."""
    import glob
    import re
    from kernels import triton_delta
    assert "PREC" in triton_delta.SCAN_TUNING_KEY and "PREC" in triton_delta.GRADS_TUNING_KEY
    found = 0
    for path in glob.glob(os.path.join(REPO, "kernels", "*.py")):
        source = open(path).read()
        for name, args in re.findall(r"@autotune_(?:scan|grads)\n(?:@[^\n]*\n)*def (\w+)\((.*?)\):", source, re.S):
            assert "PREC" in {a.split(":")[0].strip() for a in args.split(",")}, name
            found += 1
    assert found >= 10                     # the delta, momentum and linear-memory scans


def gate_pattern(values, T, device):
    """[1, T, 1] gates cycling through `values`."""
    return torch.tensor(values).repeat(T // len(values) + 1)[:T].view(1, T, 1).to(device)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_tiny_gates_get_accurate_gradients(op):
    """Gates of 1e-6 and 1e-20 among larger ones: reachable (HOPE's alpha = sigmoid(.),
    Titans' beta = sigmoid(.) and alpha = 1 - sigmoid(.), down to 6e-8). The log-gate
    gradients were once cumsums of rowsum - colsum over the decay matrices, whose O(1)
    terms cancel to an absolute error of ~1e-7 that the division by the gate made relative
    errors of 0.1 at gates of 1e-6 and 1e12 at 1e-20."""
    inputs = make_inputs(op, 1, 37, 1, 16, 16, True)
    inputs["alpha"] = gate_pattern([1e-6, 1.0, 1e-20, 0.7], 37, DEVICE)
    if op == "momentum":
        inputs["beta"] = inputs["alpha"].roll(1, 1)
    errors, _ = compare_with_reference(op, inputs, 32)
    assert_close(errors, 1e-4, op)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's numpy log(0)
def test_zero_gates_get_zero_gradients_not_nan(op):
    """A gate of exactly 0 (Titans: alpha = 1 - sigmoid(.) once the forget logit is above
    ~17, beta = 0 without momentum) gets the gradient of its clamped log, 0, as on the
    chunked PyTorch path (kernels/chunked.py; test_kernels.py checks it against the
    reference), which this compares with. It was dlog / 0 = NaN, which the sigmoid's zero
    derivative upstream passes on as NaN."""
    inputs = make_inputs(op, 1, 37, 1, 16, 16, True)
    inputs["alpha"] = gate_pattern([0.0, 1.0, 0.5, 0.0, 0.9], 37, DEVICE)
    if op == "momentum":
        inputs["beta"] = inputs["alpha"].roll(2, 1)
    torch_path = functools.partial(getattr(kernels, f"{op}_rule"), backend="torch")
    grads = []
    for fn in (OPS[op][0], torch_path):
        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
        outs = run_op(op, fn, {**inputs, **leaves}, chunk_size=32)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
        grads.append(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
    for name, ours in grads[0].items():
        assert torch.isfinite(ours).all(), f"{op}: d{name} is not finite"
        assert relative_error(ours, grads[1][name].double()) <= 1e-4, f"{op}: d{name}"
    for name in ("alpha", "beta"):
        if name in inputs:
            assert torch.all(grads[0][name][inputs[name] == 0] == 0), f"{op}: d{name} at 0"


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_fp32_products_follow_torch_matmul_precision(op):
    """fp32 inputs: exact products at PyTorch's default "highest", tf32 tensor cores at
    "high"/"medium" (what train.setup_precision sets for bf16 training on CUDA); 16-bit
    inputs always tf32. The "high" run still matches the float64 reference to tf32's
    rounding (which the kernels apply to their operands themselves, triton_delta._dot, so
    the interpreter shows it too: its tl.dot is exact fp32 at any input_precision), and is
    measurably further from it than the "highest" run, output by output and gradient by
    gradient (~5e-4 vs ~2e-7). Kills launchers that pass PREC="ieee" whatever
    dot_precision says (triton_delta._launch_dims), for all kernels or only the forward's
    or the backward's, which the dot_precision checks and the upper bound cannot see."""
    from kernels.triton_delta import dot_precision
    with fp32_matmul_precision("highest"):
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
    for setting in ("high", "medium"):
        with fp32_matmul_precision(setting):
            assert dot_precision(torch.float32) == "tf32"
    errors = {}
    for setting in ("highest", "high"):
        with fp32_matmul_precision(setting):
            errors[setting], dtypes_ok = compare_with_reference(
                op, make_inputs(op, 1, 19, 1, 16, 16, True), 16)
        assert dtypes_ok
    assert_close(errors["high"], 1e-2, f"{op} fp32 at matmul precision high")
    exact = {n: f"{e:.1e} (highest: {errors['highest'][n]:.1e})" for n, e in errors["high"].items()
             if not e > 20 * errors["highest"][n]}
    assert not exact, f"{op}: no tf32 rounding at matmul precision high: {exact}"


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_gradients_when_only_o_is_used(op):
    """The final states get no gradient: the backward must treat them as zero."""
    errors, _ = compare_with_reference(op, make_inputs(op, 1, 19, 1, 16, 16, True), 16,
                                       loss_on="o")
    assert_close({n: e for n, e in errors.items() if n.startswith("d")}, 1e-4, op)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_no_grad_forward_matches_and_saves_nothing(op):
    fn = OPS[op][0]
    inputs = make_inputs(op, 1, 19, 1, 16, 16, True)
    with_grad = run_op(op, fn, {n: None if t is None else t.clone().requires_grad_()
                                for n, t in inputs.items()}, chunk_size=16)
    with torch.no_grad():
        without_grad = run_op(op, fn, inputs, chunk_size=16)
    for a, b in zip(with_grad, without_grad):
        assert torch.equal(a.detach(), b)
    assert not any(t.requires_grad for t in without_grad)


@needs_kernels
@pytest.mark.parametrize("with_state", [False, True])
def test_no_grad_delta_forward_in_segments_matches_one_pass(monkeypatch, with_state):
    """A delta-rule forward without grad runs a long input in segments of NO_GRAD_SEGMENT
    tokens, each from the last one's S_T (its fp32 work buffers are then one segment's): the
    outputs and final state equal one pass's, with or without an initial state, at a length
    that is not a multiple of the segment or the chunk."""
    from kernels import triton_delta
    inputs = make_inputs("delta", 2, 83, 2, 16, 16, with_state)
    with torch.no_grad():
        whole = run_op("delta", triton_scans.delta_rule_triton, inputs, chunk_size=16)
        monkeypatch.setattr(triton_delta, "NO_GRAD_SEGMENT", 32)
        calls = []
        monkeypatch.setattr(triton_delta, "_launch_dims", lambda q, *a: calls.append(q.shape[1]) or
                            _launch_dims(q, *a))
        pieces = run_op("delta", triton_scans.delta_rule_triton, inputs, chunk_size=16)
    assert calls == [32, 32, 19]
    for a, b in zip(whole, pieces):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_custom_ops_pass_opcheck(op):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch: what
    torch.compile relies on to trace through the kernels."""
    inputs = make_inputs(op, 1, 5, 1, 16, 16, True)
    args = [inputs[n].requires_grad_() for n in ("q", "k", "u", "alpha", OPS[op][2])]
    states = [inputs[n].requires_grad_() for n in OPS[op][3]]
    custom_op = getattr(torch.ops.nested_learning, f"{op}_rule_fwd").default
    torch.library.opcheck(custom_op, (*args, *states, 16, True))


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_backward_through_a_forward_that_saved_nothing_raises(op):
    """The forward op keeps the chunk states only when asked to (save=False is inference):
    a backward through such a run gets one line naming the entry point."""
    inputs = make_inputs(op, 1, 5, 1, 16, 16, True)
    args = [inputs[n].requires_grad_() for n in ("q", "k", "u", "alpha", OPS[op][2])]
    states = [inputs[n] for n in OPS[op][3]]
    outputs = getattr(torch.ops.nested_learning, f"{op}_rule_fwd")(*args, *states, 16, False)
    with pytest.raises(RuntimeError, match=f"{op}_rule_triton: backward through a forward run "
                                           f"without grad tracking"):
        outputs[0].sum().backward()


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(1, 4, 1)), "q must be [B,T,H,K]"),
    (dict(k=torch.zeros(1, 5, 1, 16)), "k must be [B,T,H,K]"),
    (dict(u=torch.zeros(1, 4, 2, 16)), "u must be [B,T,H,V]"),
    (dict(alpha=torch.zeros(1, 4)), "alpha must be [B,T,H]"),
    (dict(initial_state=torch.zeros(1, 1, 16, 8)), "initial_state must be [B,H,V,K]"),
    (dict(q=torch.zeros(1, 4, 1, 16, dtype=torch.float64)), "q must be float32, bfloat16"),
    (dict(eta=[0.5] * 4), "eta must be a torch.Tensor"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(q=torch.zeros(1, 4, 1, 256), k=torch.zeros(1, 4, 1, 256)), "exceeds 128"),
])
def test_bad_inputs_raise_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        triton_scans.delta_rule_triton(**_delta_inputs(change))


def _delta_inputs(change):
    inputs = {"q": torch.zeros(1, 4, 1, 16), "k": torch.zeros(1, 4, 1, 16),
              "u": torch.zeros(1, 4, 1, 16), "alpha": torch.ones(1, 4, 1),
              "eta": torch.zeros(1, 4, 1), "initial_state": None, "chunk_size": 16, **change}
    return {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}


@pytest.mark.parametrize("change", [
    dict(q=torch.zeros(1, 4, 1)), dict(k=torch.zeros(1, 5, 1, 16)), dict(u=torch.zeros(1, 4, 2, 16)),
    dict(alpha=torch.zeros(1, 4)), dict(initial_state=torch.zeros(1, 1, 16, 8)),
    dict(eta=[0.5] * 4), dict(chunk_size=0), dict(chunk_size=2.5)])
def test_dispatcher_and_triton_entry_share_one_input_check(change):
    """kernels.delta_rule and delta_rule_triton both run kernels/checks.py: the same bad
    input gets the same one-line message on either path."""
    messages = []
    for fn in (kernels.delta_rule, triton_scans.delta_rule_triton):
        with pytest.raises(ValueError) as error:
            fn(**_delta_inputs(change))
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]


@needs_kernels
def test_every_custom_op_launches_on_its_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every nested_learning
    op (all kernel files) runs under triton_delta.on_input_device, which makes its first
    tensor's device current, so a model on cuda:1 does not launch on cuda:0 against cuda:1
    memory. The device switch is recorded here with a stand-in for torch.cuda.device (one
    GPU, or none, cannot show it)."""
    from types import SimpleNamespace
    from torch._library.custom_ops import OPDEFS
    from kernels import triton_budget, triton_cms, triton_delta, triton_hope, triton_memory  # noqa: F401
    from kernels import triton_mlp_memory  # noqa: F401
    guarded_code = triton_delta.on_input_device(lambda first: None).__code__
    ops = {name: op for name, op in OPDEFS.items() if name.startswith("nested_learning::")}
    assert len(ops) >= 18                          # the six kernel files register 18
    unguarded = [name for name, op in ops.items() if op._init_fn.__code__ is not guarded_code]
    assert not unguarded, f"ops that launch on the current device, not their inputs': {unguarded}"

    current = ["cuda:0"]

    class Device:                                      # torch.cuda.device's context protocol
        def __init__(self, device):
            self.device, self.before = str(device), None

        def __enter__(self):
            self.before, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "device", Device)
    launch = triton_delta.on_input_device(lambda first, *rest, **kw: (current[0], rest, kw))
    assert launch(SimpleNamespace(device=torch.device("cuda:1")), 2, x=3) == ("cuda:1", (2,), {"x": 3})
    assert current == ["cuda:0"]
    assert launch(torch.zeros(1))[0] == "cuda:0"      # CPU tensors (the interpreter): no switch


@needs_kernels
@pytest.mark.parametrize("used, overlap, message", [
    ((1, 16), (4, 16, 16), "used must be [4, 16] to match wanted [4, 16]; got [1, 16]"),
    ((4, 16), (2, 16, 16), "overlap must be [4, 16, 16] to match wanted [4, 16]; got [2, 16, 16]"),
])
def test_step_budget_rejects_shapes_it_would_read_past(used, overlap, message):
    """capped_steps' kernels read used and overlap at wanted's rows, after a reshape(-1, C)
    that any tensor whose size C divides passes: fewer rows were read past their end without
    an error (garbage caps). Now one line naming the tensor."""
    from kernels import triton_budget
    with pytest.raises(ValueError) as e:
        triton_budget.capped_steps(torch.zeros(4, 16, device=DEVICE), torch.zeros(used, device=DEVICE),
                                   torch.zeros(overlap, device=DEVICE), 0.5)
    assert str(e.value) == message


@needs_kernels
@pytest.mark.parametrize("eta_max", [torch.tensor(1.0, requires_grad=True), 0.0, float("nan"), True])
def test_hope_projections_reject_eta_max_they_cannot_take(eta_max):
    """The fused stage 1 takes eta_max as a float constant (like the CMS kernel's lr): a
    tensor's gradient would be dropped without a word, and eta_max <= 0 or NaN makes no
    learning rate (hope.py's config asks for > 0)."""
    from kernels import triton_hope
    H, d = 1, 16
    x = torch.zeros(1, 4, H, d, device=DEVICE)
    w = torch.zeros(1, 4 * H, d, d, device=DEVICE)
    gate_w, gate_b = torch.zeros(H, d, device=DEVICE), torch.zeros(H, device=DEVICE)
    with pytest.raises(ValueError, match="eta_max must be a finite number > 0"):
        triton_hope.fused_hope_projections(x, w, w, gate_w, gate_b, gate_w, gate_b, eta_max, 16)


# ----------------------------------------------------------------------------- CUDA only

@needs_cuda
@pytest.mark.parametrize("dtype, tol, precision", [(torch.float32, 1e-4, "highest"),
                                                   (torch.float32, 1e-2, "high"),
                                                   (torch.bfloat16, 1e-2, "highest")],
                         ids=["fp32", "fp32-tf32", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_realistic_size_matches_float64_reference(op, dtype, tol, precision):
    """B=2, T=1000 (not a multiple of the chunk), H=4, K=V=64: bf16 inputs (the reference
    sees the same rounded values) run with fp32 states, so only output rounding and tf32
    products separate them; fp32 inputs at matmul precision "high" (bf16 training) take tf32
    products too."""
    inputs = make_inputs(op, 2, 1000, 4, 64, 64, True, dtype=dtype)
    with fp32_matmul_precision(precision):
        errors, dtypes_ok = compare_with_reference(op, inputs, 64)
    assert dtypes_ok
    assert_close(errors, tol, f"{op} {dtype}")


@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_long_sequence_bf16_is_finite(op):
    inputs = make_inputs(op, 2, 16384, 4, 64, 64, True, dtype=torch.bfloat16)
    inputs = {n: t.requires_grad_() for n, t in inputs.items()}
    outputs = run_op(op, OPS[op][0], inputs)
    sum(out.float().square().mean() for out in outputs).backward()
    for name, t in [*zip(OPS[op][4], outputs), *[("d" + n, t.grad) for n, t in inputs.items()]]:
        assert torch.isfinite(t).all(), f"{op}: {name} has non-finite values at T=16384"


@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_torch_compile_fullgraph_matches_eager(op):
    fn = OPS[op][0]

    def loss_fn(inputs):
        return sum(out.float().square().sum() for out in run_op(op, fn, inputs, chunk_size=64))

    compiled = torch.compile(loss_fn, fullgraph=True)
    inputs = make_inputs(op, 2, 200, 4, 64, 64, True)
    eager_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    compiled_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    eager_loss, compiled_loss = loss_fn(eager_in), compiled(compiled_in)
    eager_loss.backward()
    compiled_loss.backward()
    assert torch.allclose(eager_loss, compiled_loss, rtol=1e-5)
    for n in inputs:
        assert torch.allclose(eager_in[n].grad, compiled_in[n].grad, rtol=1e-4, atol=1e-5), n


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_fake_implementations_match_strides_of_permuted_inputs(op):
    """The ops make their inputs contiguous, so every output is row-major whatever the
    inputs' strides: the fake implementations (torch.compile's view of the outputs) must say
    the same. Permuted inputs, two chunks; the backward op too (what opcheck on the forward
    alone never calls with permuted tensors)."""
    inputs = make_inputs(op, 1, 20, 2, 16, 16, True)
    args = [stored_transposed(inputs[n]) for n in ("q", "k", "u", "alpha", OPS[op][2])]
    states = [stored_transposed(inputs[n], (-1, -2)) for n in OPS[op][3]]
    fake_only = ("test_schema", "test_faketensor")
    fwd = getattr(torch.ops.nested_learning, f"{op}_rule_fwd").default
    torch.library.opcheck(fwd, (*args, *states, 16, False), test_utils=fake_only)
    with torch.no_grad():
        out = fwd(*args, *states, 16, True)
    grads = [stored_transposed(torch.randn_like(out[0]))]
    grads += [stored_transposed(torch.randn_like(s), (-1, -2)) for s in out[1:1 + len(states)]]
    bwd = getattr(torch.ops.nested_learning, f"{op}_rule_bwd").default
    torch.library.opcheck(bwd, (*args, *out[-2:], *grads, 16), test_utils=fake_only)
