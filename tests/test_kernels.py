"""Chunked PyTorch scans vs the sequential reference (DESIGN §3.2, §4): outputs, final
states and gradients of every input, any T, any chunk size, edge-case gates, dispatch and
input validation. Triton kernels are tested elsewhere."""
import inspect

import pytest
import torch

import kernels
from kernels import chunked

OPS = ("delta", "momentum")


def make_inputs(op, B=2, T=7, H=2, K=4, V=3, dtype=torch.float64, seed=0, states=True,
                gate_floor=0.0):
    """Random inputs for `op` as a dict of leaf tensors. Gates lie in (gate_floor, 1] with
    some exactly 1; for delta some eta are exactly 0. Delta keys are not unit-norm: eta is
    the DGD proximal step eta/(1 + eta |k|^2) (DESIGN §3.3), which keeps the recurrence
    stable for any key norm."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def gate():
        x = gate_floor + (1 - gate_floor) * rand(B, T, H)
        return torch.where(rand(B, T, H) < 0.2, torch.ones_like(x), x)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "u": randn(B, T, H, V),
         "alpha": gate()}
    if op == "delta":
        eta = torch.where(rand(B, T, H) < 0.2, torch.zeros(B, T, H, dtype=torch.float64),
                          rand(B, T, H))
        x["eta"] = eta / (1 + eta * x["k"].pow(2).sum(-1))
        if states:
            x["initial_state"] = randn(B, H, V, K)
    else:
        x["beta"] = gate()
        if states:
            x["initial_state"] = randn(B, H, V, K)
            x["initial_momentum"] = randn(B, H, V, K)
    return {n: t.to(dtype).requires_grad_() for n, t in x.items()}


def run(op, x, backend, chunk_size=64):
    fn = kernels.delta_rule if op == "delta" else kernels.momentum_rule
    return fn(**x, chunk_size=chunk_size, backend=backend)


def outputs_and_grads(op, x, backend, chunk_size=64, seed=1):
    """Outputs plus the gradient of every input under a random cotangent on all outputs."""
    outs = run(op, x, backend, chunk_size)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, list(x.values()))
    return list(outs), dict(zip(x, grads))


def assert_close(actual, expected, rel, what):
    scale = expected.abs().max().item() + 1e-30
    err = (actual.double() - expected.double()).abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:g} * {scale:.3g}"


def compare_with_reference(op, x, chunk_size, rel):
    ref_outs, ref_grads = outputs_and_grads(op, x, "reference")
    outs, grads = outputs_and_grads(op, x, "torch", chunk_size)
    names = ["o", "S_T", "Z_T"]
    for name, a, e in zip(names, outs, ref_outs):
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
        assert_close(a, e, rel, name)
    for name in x:
        assert_close(grads[name], ref_grads[name], rel, f"grad {name}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 7, 33, 64])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("states", [True, False])
def test_matches_reference_float64(op, T, chunk_size, states):
    x = make_inputs(op, T=T, states=states, seed=T * 100 + chunk_size)
    compare_with_reference(op, x, chunk_size, rel=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T,chunk_size", [(33, 16), (64, 64), (7, 4)])
def test_matches_reference_float32(op, T, chunk_size):
    x = make_inputs(op, T=T, dtype=torch.float32, seed=7)
    compare_with_reference(op, x, chunk_size, rel=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_batch_heads_and_value_dim(op):
    """B>1, H>1 and V != K (both ways) with each (batch, head) independent."""
    for K, V in [(4, 6), (6, 2)]:
        x = make_inputs(op, B=3, T=9, H=3, K=K, V=V, seed=K)
        compare_with_reference(op, x, chunk_size=4, rel=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_chunk_size_changes_nothing(op):
    x = make_inputs(op, T=33, seed=3)
    base_outs, base_grads = outputs_and_grads(op, x, "torch", chunk_size=1)
    for chunk_size in (2, 5, 16, 32, 33, 100):
        outs, grads = outputs_and_grads(op, x, "torch", chunk_size=chunk_size)
        for a, e in zip(outs, base_outs):
            assert_close(a, e, 1e-12, f"chunk_size={chunk_size} output")
        for name in x:
            assert_close(grads[name], base_grads[name], 1e-12,
                         f"chunk_size={chunk_size} grad {name}")


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_chunked(op):
    x = make_inputs(op, B=1, T=5, H=2, K=3, V=2, seed=11, gate_floor=0.1)
    names = list(x)
    fn = chunked.delta_rule_chunked if op == "delta" else chunked.momentum_rule_chunked

    def f(*tensors):
        return fn(**dict(zip(names, tensors)), chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(x.values()), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gates_near_zero(op, dtype):
    """Gates of 1e-6 underflow cumulative products (1e-6^20 = 1e-120, below fp32's range);
    results and gradients must stay finite and equal to the reference."""
    x = make_inputs(op, T=20, seed=5, dtype=dtype)
    with torch.no_grad():
        for name in ("alpha", "beta"):
            if name in x:
                x[name].fill_(1e-6)
                x[name][:, 10:13] = 1.0
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    compare_with_reference(op, x, chunk_size=8, rel=rel)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["tiny_gates_alternating", "no_forgetting_strong_steps"])
def test_extreme_reachable_gates_float32(op, case):
    """fp32 at the ends of what memory.py produces: gates of 1e-20 alternating with 1
    (sigmoid gates; their cumulative products span 1e-400), and alpha = beta = 1 for every
    token with DGD steps eta |k|^2 = lr |k|^2 / (1 + lr |k|^2) near 1 (no forgetting, large
    keys and rates), over several chunks with a ragged tail."""
    x = make_inputs(op, T=150, seed=8, dtype=torch.float32)
    with torch.no_grad():
        gates = [x[n] for n in ("alpha", "beta") if n in x]
        for i, gate in enumerate(gates):
            if case == "tiny_gates_alternating":
                gate.fill_(1.0)
                gate[:, i::2] = 1e-20
            else:
                gate.fill_(1.0)
        if op == "delta" and case == "no_forgetting_strong_steps":
            x["eta"].copy_(1e3 / (1 + 1e3 * x["k"].pow(2).sum(-1)))
    compare_with_reference(op, x, chunk_size=32, rel=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_gates_exactly_zero(op):
    """A gate of exactly 0 resets the memory: outputs, states and the gradients of every
    input match the reference, except the gradient w.r.t. the zero gates themselves,
    which the log-space products set to 0 (documented in kernels/chunked.py)."""
    x = make_inputs(op, T=20, seed=6)
    gates = [n for n in ("alpha", "beta") if n in x]
    zero = torch.zeros_like(x["alpha"], dtype=torch.bool)
    zero[0, 3, 1] = zero[1, 9, 0] = zero[:, 16] = True
    with torch.no_grad():
        for name in gates:
            x[name][zero] = 0.0
    ref_outs, ref_grads = outputs_and_grads(op, x, "reference")
    outs, grads = outputs_and_grads(op, x, "torch", chunk_size=8)
    for a, e in zip(outs, ref_outs):
        assert_close(a, e, 1e-10, "output")
    for name in x:
        if name in gates:
            assert torch.all(grads[name][zero] == 0), f"grad {name} at zero gates"
            grads[name][zero] = ref_grads[name][zero]
        assert_close(grads[name], ref_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("op", OPS)
def test_half_precision_inputs_upcast(op):
    """bf16 inputs: the chunked path computes in fp32 (as the reference does,
    test_reference_computes_half_precision_in_fp32), so its fp32 states agree with the
    reference's to fp32 accuracy; only o is rounded to bf16 on the way out. Kills a chunked
    path that computes in bf16 and casts its states up at the end (errors of ~1e-2)."""
    x = {n: t.detach().to(torch.bfloat16) for n, t in make_inputs(op, T=10, seed=2).items()}
    outs = run(op, x, "torch", chunk_size=4)
    ref = run(op, x, "reference")
    assert outs[0].dtype == torch.bfloat16, "o must come back in q's dtype"
    assert all(s.dtype == torch.float32 for s in outs[1:]), "states are computed in fp32"
    assert_close(outs[0].float(), ref[0].float(), 2e-2, "bf16 o")
    for name, a, e in zip(["S_T", "Z_T"], outs[1:], ref[1:]):
        assert_close(a, e, 1e-5, name)


@pytest.mark.parametrize("op", OPS)
def test_empty_sequence_returns_initial_state(op):
    x = make_inputs(op, T=0, seed=4)
    outs = run(op, x, "torch", chunk_size=4)
    assert outs[0].shape == (2, 0, 2, 3)
    assert torch.equal(outs[1], x["initial_state"])
    if op == "momentum":
        assert torch.equal(outs[2], x["initial_momentum"])


def test_auto_backend_on_cpu_uses_chunked_torch(monkeypatch):
    assert kernels.select_backend("auto", "cpu") == "torch"
    assert kernels.select_backend("reference", "cpu") == "reference"
    calls = []
    for name in ("delta_rule_chunked", "momentum_rule_chunked"):
        original = getattr(chunked, name)

        def spy(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(chunked, name, spy)
    for op in OPS:
        x = {n: t.detach() for n, t in make_inputs(op, T=6, seed=9).items()}
        auto, torch_path = run(op, x, "auto", 4), run(op, x, "torch", 4)
        for a, e in zip(auto, torch_path):
            assert torch.equal(a, e)
    assert calls == ["delta_rule_chunked"] * 2 + ["momentum_rule_chunked"] * 2


def test_auto_backend_on_cuda_picks_triton_when_it_imports(monkeypatch):
    """Resolution only (no GPU needed): CUDA + a Triton dtype + importable kernels."""
    monkeypatch.setattr(kernels, "_triton_scans", lambda: None)
    assert kernels.select_backend("auto", "cuda", torch.bfloat16) == "triton"
    assert kernels.select_backend("auto", "cuda", torch.float64) == "torch"
    assert kernels.select_backend("auto", "cuda", torch.bfloat16, key_dim=256) == "torch"   # Triton: K <= 128
    assert kernels.select_backend("auto", "cuda", torch.bfloat16, key_dim=128) == "triton"
    assert kernels.select_backend("auto", "cpu", torch.float32) == "torch"

    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(kernels, "_triton_scans", missing)
    assert kernels.select_backend("auto", "cuda", torch.float32) == "torch"
    with pytest.raises(ImportError, match="backend='triton' needs kernels.triton_scans"):
        run("delta", _bad("delta"), "triton")


def _bad(op, **changes):
    x = {n: t.detach() for n, t in make_inputs(op, B=2, T=5, H=3, K=8, V=4, seed=0).items()}
    x.update(changes)
    return x


@pytest.mark.parametrize("op,changes,message", [
    ("delta", {"q": torch.zeros(2, 5, 3)}, r"q must be \[B,T,H,K\]; got \[2, 5, 3\]"),
    ("delta", {"k": torch.zeros(2, 5, 3, 7)}, r"k must be \[B,T,H,K\] = q's shape"),
    ("delta", {"u": torch.zeros(2, 5, 3)},
     r"u must be \[B,T,H,V\] with B,T,H matching q \[2, 5, 3, 8\]; got \[2, 5, 3\]"),
    ("momentum", {"u": torch.zeros(2, 4, 3, 4)}, r"u must be \[B,T,H,V\]"),
    ("delta", {"alpha": torch.ones(2, 5)}, r"alpha must be \[B,T,H\] = \[2, 5, 3\]"),
    ("delta", {"eta": torch.ones(2, 5, 3, 1)}, r"eta must be \[B,T,H\]"),
    ("momentum", {"beta": torch.ones(5, 3)}, r"beta must be \[B,T,H\]"),
    ("delta", {"initial_state": torch.zeros(2, 3, 8, 4)},
     r"initial_state must be \[B,H,V,K\] = \[2, 3, 4, 8\]; got \[2, 3, 8, 4\]"),
    ("momentum", {"initial_momentum": torch.zeros(2, 3, 4)}, r"initial_momentum must be"),
    ("delta", {"q": torch.zeros(2, 5, 3, 8, dtype=torch.long)},
     r"q must be a floating-point tensor; got torch.int64"),
    ("momentum", {"alpha": [1.0]}, r"alpha must be a torch.Tensor; got list"),
])
def test_shape_and_dtype_errors(op, changes, message):
    with pytest.raises(ValueError, match=message):
        run(op, _bad(op, **changes), "auto")


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        run("delta", _bad("delta"), "torch", chunk_size=chunk_size)


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="backend must be one of auto, reference, torch, triton"):
        run("momentum", _bad("momentum"), "cuda")


# ----------------------------------------------------------------------------------------
# the reference itself against the equations, dtypes, and what the dispatcher forwards

def _scan_by_equation(op, x):
    """DESIGN §3.2 one (batch, head) and one token at a time in float64, in the matrix form
    of the docstrings: delta S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T;
    momentum Z_t = beta_t Z_{t-1} + u_t k_t^T, S_t = alpha_t S_{t-1} + Z_t; o_t = S_t q_t."""
    d = {n: t.detach().double() for n, t in x.items()}
    B, T, H, K = d["q"].shape
    V = d["u"].shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    S_end, Z_end = torch.zeros(B, H, V, K, dtype=torch.float64), torch.zeros(B, H, V, K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = d["initial_state"][b, h].clone() if "initial_state" in d else torch.zeros(V, K, dtype=torch.float64)
            Z = d["initial_momentum"][b, h].clone() if "initial_momentum" in d else torch.zeros(V, K, dtype=torch.float64)
            for t in range(T):
                k, u, a = d["k"][b, t, h], d["u"][b, t, h], d["alpha"][b, t, h]
                if op == "delta":
                    S = S @ (a * torch.eye(K, dtype=torch.float64) - d["eta"][b, t, h] * torch.outer(k, k)) \
                        + torch.outer(u, k)
                else:
                    Z = d["beta"][b, t, h] * Z + torch.outer(u, k)
                    S = a * S + Z
                o[b, t, h] = S @ d["q"][b, t, h]
            S_end[b, h], Z_end[b, h] = S, Z
    return o, S_end, Z_end


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("states", [True, False])
def test_reference_follows_the_equation(op, states):
    """The oracle of every other test, checked against the recurrence written directly from
    DESIGN §3.2 (matrix form, per head, float64): outputs and final states. Guards against
    the reference and the chunked path drifting from the equation together."""
    x = make_inputs(op, B=2, T=6, H=2, K=3, V=2, seed=21, states=states)
    o, S, Z = _scan_by_equation(op, x)
    outs = run(op, x, "reference")
    assert_close(outs[0], o, 1e-12, "o")
    assert_close(outs[1], S, 1e-12, "S_T")
    if op == "momentum":
        assert_close(outs[2], Z, 1e-12, "Z_T")


@pytest.mark.parametrize("op", OPS)
def test_reference_computes_half_precision_in_fp32(op):
    """bf16 inputs: the reference (the oracle) computes in float32 and returns its states in
    float32 (module doc), so it agrees with the float64 equation on the same bf16 values to
    fp32 accuracy; only o is rounded to bf16 on the way out. Kills a reference that computes
    in the inputs' own dtype (bf16 states, errors growing along the recurrence)."""
    x = {n: t.detach().to(torch.bfloat16) for n, t in make_inputs(op, T=12, seed=22).items()}
    o, S, Z = _scan_by_equation(op, x)
    outs = run(op, x, "reference")
    assert outs[0].dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in outs[1:]), [s.dtype for s in outs[1:]]
    assert_close(outs[1], S, 1e-5, "S_T")
    if op == "momentum":
        assert_close(outs[2], Z, 1e-5, "Z_T")
    # o: bf16 rounding of each entry (relative 2^-8) on top of fp32 accuracy
    err = (outs[0].double() - o).abs()
    assert (err <= 2 ** -8 * o.abs() + 1e-5 * o.abs().max()).all(), err.max()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wide", ["k", "u", "alpha", "initial_state"])
def test_the_widest_input_dtype_is_the_compute_dtype(op, wide):
    """An fp32 q with one float64 input computes in float64 (it computed in q's fp32): the
    states come back float64 and equal the all-float64 run's; o in q's dtype, equal to it up
    to fp32 rounding. Both PyTorch backends."""
    x64 = {n: t.detach() for n, t in make_inputs(op, T=9, seed=5).items()}
    x = {n: (t if n == wide else t.float()) for n, t in x64.items()}
    for backend in ("torch", "reference"):
        want, got = run(op, x64, backend, chunk_size=4), run(op, x, backend, chunk_size=4)
        assert got[0].dtype == torch.float32 and all(s.dtype == torch.float64 for s in got[1:])
        for name, a, e in zip(["S_T", "Z_T"], got[1:], want[1:]):    # inputs rounded to fp32: ~1e-7
            assert_close(a, e, 1e-6, f"{backend} {name}")
        assert_close(got[0], want[0], 1e-6, f"{backend} o")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [0, 5])
def test_output_dtype_is_q_dtype_with_mixed_inputs(op, T):
    """'o comes back in q's dtype' (kernels/chunked.py) also when u has another dtype, and for
    T = 0 (the empty-sequence branch builds o itself); same as the reference."""
    x = {n: t.detach() for n, t in make_inputs(op, T=T, seed=23).items()}
    x["q"] = x["q"].float()
    for backend in ("torch", "reference"):
        outs = run(op, x, backend, chunk_size=4)
        assert outs[0].dtype == torch.float32 and outs[0].shape == (2, T, 2, 3), (backend, outs[0].dtype)


@pytest.mark.parametrize("op", OPS)
def test_chunked_functions_reject_chunk_size_zero(op):
    """kernels.chunked is also called directly (memory.py, cms.py): chunk_size < 1 is a
    ValueError there too, not a ZeroDivisionError from the chunk split."""
    fn = chunked.delta_rule_chunked if op == "delta" else chunked.momentum_rule_chunked
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        fn(**_bad(op), chunk_size=0)


@pytest.mark.parametrize("op", OPS)
def test_dispatch_forwards_every_argument(op, monkeypatch):
    """kernels.delta_rule / momentum_rule hand every argument, as the parameter it is, to the backend they
    pick: the chunked path (chunk_size included: it sets the speed, never the result, so only
    a spy sees it) and the Triton entry points (a fake module stands in for them on CPU);
    select_backend gets the key head dim (K > MAX_KEY_DIM must fall back to torch on CUDA)."""
    x = {n: t.detach() for n, t in make_inputs(op, T=5, K=4, seed=24).items()}
    calls = []

    result = ("o", "S") if op == "delta" else ("o", "S", "Z")

    def recorder(tag):
        def fn(*args, **kw):
            calls.append((tag, args, kw))
            return result
        return fn

    fake = type("FakeTritonScans", (), {"delta_rule_triton": staticmethod(recorder("triton")),
                                          "momentum_rule_triton": staticmethod(recorder("triton"))})
    monkeypatch.setattr(kernels, "_triton_scans", lambda: fake)
    chunked_name = "delta_rule_chunked" if op == "delta" else "momentum_rule_chunked"
    # both backends share the chunked functions' signature (triton_scans.py)
    signature = inspect.signature(getattr(chunked, chunked_name))
    monkeypatch.setattr(chunked, chunked_name, recorder("torch"))
    original_select = kernels.select_backend
    selects = []

    def select_spy(*args, **kw):
        selects.append((args, kw))
        return original_select(*args, **kw)

    monkeypatch.setattr(kernels, "select_backend", select_spy)
    for backend in ("torch", "triton"):
        calls.clear()
        assert run(op, x, backend, chunk_size=3) == result
        (tag, args, kw), = calls
        assert tag == backend
        passed = signature.bind(*args, **kw).arguments
        for name, expected in x.items():
            assert passed.get(name) is expected, f"{backend}: argument {name} not forwarded as {name}"
        assert passed.get("chunk_size") == 3, f"{backend}: chunk_size not forwarded"
    args, kw = selects[-1]
    key_dim = kw.get("key_dim", args[3] if len(args) > 3 else None)
    assert key_dim == 4, selects[-1]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wide", ["k", "u", "alpha", "state"])
def test_auto_backend_weighs_every_input_dtype(op, wide, monkeypatch):
    """select_backend("auto") on CUDA takes torch when any input is float64, not only q: an
    fp32 q with a float64 k, write, gate or state would pick Triton, which refuses float64.
    Resolution only (no GPU needed): the dispatcher's choice is recorded, not run."""
    monkeypatch.setattr(kernels, "_triton_scans", lambda: None)
    assert kernels.select_backend("auto", "cuda", [torch.float32, None, torch.float64]) == "torch"
    assert kernels.select_backend("auto", "cuda", [torch.float32, None, torch.bfloat16]) == "triton"
    x = {n: t.detach().float() for n, t in make_inputs(op, T=5, K=4, seed=3).items()}
    name = {"state": "initial_state"}.get(wide, wide)
    x[name] = x[name].double()
    original, chosen = kernels.select_backend, []
    monkeypatch.setattr(kernels, "select_backend",
                        lambda *a, **kw: chosen.append(original(a[0], "cuda", *a[2:], **kw)) or "torch")
    run(op, x, "auto", 4)
    assert chosen == ["torch"]
