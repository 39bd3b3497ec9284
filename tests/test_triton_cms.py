"""The fused CMS fast-level kernels (kernels/triton_cms.py) against cms.fast_level_scan (the
oracle, run in float64): y, the final state (weights, carried grads) and the gradients of
every input (a, target, initial weights, incoming grads), on random data with T not a multiple
of C, segments starting and ending mid-chunk, both activations.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): fp32, tiny sizes. With a GPU the same cases
run natively, plus a realistic size.
"""
import pytest
import torch

from helpers import DEVICE, needs_cuda, triton_kernels_or_skip

needs_kernels = triton_kernels_or_skip()

from cms import CMSLevel, fast_level_scan  # noqa: E402
from kernels import triton_cms  # noqa: E402

STATE = ("w_in", "w_out", "grad_in", "grad_out")


def make_inputs(B, T, D, hidden, carry, seed=0):
    """Unit-RMS inputs (the level's a = RMSNorm(z)), targets W_v a, weights at nn.Linear's
    scale, and (carry) a partial chunk's accumulated grads."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)   # noqa: E731
    a = randn(B, T, D)
    x = {"a": a, "target": a @ randn(D, D) / D ** 0.5,
         "w_in": randn(B, hidden, D) / D ** 0.5, "w_out": randn(B, D, hidden) / hidden ** 0.5,
         "grad_in": randn(B, hidden, D) if carry else None,
         "grad_out": randn(B, D, hidden) if carry else None}
    return {n: None if t is None else t.to(DEVICE) for n, t in x.items()}


def run(fn, x, dtype, pos, C, lr, activation, strided=False):
    """strided: every input with transposed strides (same values, not contiguous)."""
    layout = (lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)) if strided else (lambda t: t)  # noqa: E731
    leaves = {n: layout(t.detach().to(dtype)).requires_grad_() for n, t in x.items() if t is not None}
    y, *state, pos_out = fn(*(leaves.get(n) for n in ("a", "target") + STATE), pos, C, lr, activation)
    return leaves, dict(zip(("y",) + STATE, [y, *state])), pos_out


def errors_vs_oracle(B=2, T=19, D=16, hidden=32, C=4, pos=0, carry=False, activation="gelu",
                     lr=0.02, strided=False):
    """Relative errors (max |diff| / max(1, max |ref|)) of every output and of the gradient of
    every input for the loss sum <out, random cotangent>: fused fp32 vs oracle fp64."""
    x = make_inputs(B, T, D, hidden, carry)
    ref_leaves, ref, ref_pos = run(fast_level_scan, x, torch.float64, pos, C, lr, activation)
    tri_leaves, tri, tri_pos = run(triton_cms.fused_fast_level, x, torch.float32, pos, C, lr,
                                   activation, strided)
    assert tri_pos == ref_pos == pos + T
    assert {n for n, t in tri.items() if t is None} == {n for n, t in ref.items() if t is None}
    ref = {n: t for n, t in ref.items() if t is not None}
    gen = torch.Generator().manual_seed(1)
    cot = {n: torch.randn(r.shape, generator=gen, dtype=torch.float64).to(DEVICE) for n, r in ref.items()}
    ref_grads = torch.autograd.grad(sum((r * cot[n]).sum() for n, r in ref.items()),
                                    list(ref_leaves.values()))
    tri_grads = torch.autograd.grad(sum((tri[n].double() * cot[n]).sum() for n in ref),
                                    list(tri_leaves.values()))
    err = lambda t, r: ((t.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()  # noqa: E731
    errors = {n: err(tri[n], r) for n, r in ref.items()}
    errors.update({"d" + n: err(t, r) for n, t, r in zip(ref_leaves, tri_grads, ref_grads)})
    return errors


def assert_close(errors, tol, what):
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad}"


# (pos, T, carry): from a sequence start with a ragged end; starting mid-chunk with carried
# grads and ending mid-chunk; ending exactly on a boundary (no grads carried out); a segment
# inside one chunk (no step at all)
SEGMENTS = [(0, 19, False), (6, 19, True), (1, 11, True), (5, 2, True)]


@needs_kernels
@pytest.mark.parametrize("segment", SEGMENTS, ids=lambda s: "pos{}-T{}-carry{}".format(*s))
@pytest.mark.parametrize("activation", ("gelu", "silu"))
def test_fused_matches_fast_level_scan(activation, segment):
    pos, T, carry = segment
    assert_close(errors_vs_oracle(T=T, pos=pos, carry=carry, activation=activation), 2e-5,
                 f"{activation} {segment}")


@needs_kernels
def test_hidden_tiled_in_several_blocks_and_odd_dims():
    """hidden = 80: three hidden blocks of 32, the last half masked; D = 12, C = 5 not powers of 2."""
    assert_close(errors_vs_oracle(B=1, T=13, D=12, hidden=80, C=5, pos=3, carry=True,
                                  activation="silu"), 2e-5, "hidden 80")


@needs_kernels
def test_non_contiguous_inputs():
    """Inputs with transposed strides: the kernels read and write row-major buffers."""
    assert_close(errors_vs_oracle(B=2, T=11, pos=1, carry=True, strided=True), 2e-5, "strided")


@needs_kernels
def test_wide_model_dim_tiles():
    """D = 100: the D > 64 tiles (BD = 128, hidden blocks of 16, 8 warps), 3 hidden blocks."""
    assert_close(errors_vs_oracle(B=1, T=7, D=100, hidden=40, C=4, pos=2, carry=True, lr=0.005),
                 2e-5, "D 100")


@needs_kernels
@pytest.mark.parametrize("pos, T", [(6, 19), (0, 16)], ids=["5-steps", "4-steps"])
def test_no_grad_forward_matches_the_saving_forward(pos, T):
    """Without grad tracking the weights alternate between two slots instead of one per chunk:
    same outputs bit for bit, for an odd and an even number of steps."""
    x = make_inputs(2, T, 16, 32, carry=True)
    args = [x[n].float() for n in ("a", "target") + STATE]
    saved = triton_cms.fused_fast_level(*[t.requires_grad_() for t in args], pos, 4, 0.02)
    with torch.no_grad():
        unsaved = triton_cms.fused_fast_level(*args, pos, 4, 0.02)
    assert (saved[3] is None) == (unsaved[3] is None) == ((pos + T) % 4 == 0)
    for s, p in zip(saved[:5], unsaved[:5]):
        if s is not None:
            torch.testing.assert_close(s, p, rtol=0, atol=0)


@needs_kernels
def test_custom_op_registration_is_consistent():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree with
    the real op, which is what torch.compile relies on."""
    x = make_inputs(1, 7, 16, 16, carry=True)
    args = [x[n].float().requires_grad_() for n in ("a", "target") + STATE]
    torch.library.opcheck(torch.ops.nested_learning.cms_fast_level_fwd.default,
                          (*args, 3, 4, 0.02, "silu", True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_kernels
def test_cms_level_dispatches_and_matches_the_torch_path_over_segments(monkeypatch):
    """CMSLevel(backend="triton") over segments [7, 6, 6] (one fused call each) vs the torch
    path in float64 over the same segments: outputs, the carried state and the parameters'
    gradients."""
    calls = []
    real = triton_cms.fused_fast_level
    monkeypatch.setattr(triton_cms, "fused_fast_level", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    fused = CMSLevel(16, 32, 4, 0.1, "gelu", 1e-6, backend="triton").to(DEVICE)
    oracle = CMSLevel(16, 32, 4, 0.1, "gelu", 1e-6, backend="torch").to(DEVICE)
    oracle.load_state_dict(fused.state_dict())
    oracle.double()
    assert fused.uses_fused_kernel()
    assert not oracle.uses_fused_kernel()
    z = torch.randn(2, 19, 16, device=DEVICE, dtype=torch.float64)
    outs = {}
    for name, level in (("fused", fused), ("oracle", oracle)):
        dtype = next(level.parameters()).dtype
        state, ys, lo = None, [], 0
        for length in (7, 6, 6):
            y, state = level(z[:, lo:lo + length].to(dtype), state)
            ys.append(y)
            lo += length
        y = torch.cat(ys, 1)
        loss = (y.double() * z).sum() + state["w_in"].double().sum() + state["grad_out"].double().sum()
        outs[name] = [y, state["w_in"], state["grad_out"],
                      *torch.autograd.grad(loss, list(level.parameters()))]
    assert len(calls) == 3
    for t, r in zip(outs["fused"], outs["oracle"]):
        assert ((t.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item() < 2e-5


def test_cms_level_keeps_the_torch_path_where_the_kernel_does_not_apply():
    assert not CMSLevel(16, 32, None, 0.1, "gelu", 1e-6, backend="triton").uses_fused_kernel()   # static
    assert not CMSLevel(16, 32, 65, 0.1, "gelu", 1e-6, backend="triton").uses_fused_kernel()     # C > 64
    assert not CMSLevel(256, 32, 4, 0.1, "gelu", 1e-6, backend="triton").uses_fused_kernel()     # D > 128
    assert not CMSLevel(16, 32, 4, 0.1, "gelu", 1e-6).uses_fused_kernel()   # "auto": opt-in until a GPU has timed it
    with pytest.raises(ValueError, match="CMS backend must be one of"):
        CMSLevel(16, 32, 4, 0.1, "gelu", 1e-6, backend="cuda")


@needs_kernels
def test_bad_inputs_raise_one_line_errors():
    x = make_inputs(1, 5, 16, 32, carry=False)
    args = {n: None if t is None else t.float() for n, t in x.items()}
    call = lambda **kw: triton_cms.fused_fast_level(**{**args, "pos": 0, "chunk_size": 4, "lr": 0.1, **kw})  # noqa: E731
    cases = [(dict(a=args["a"].double()), "a must be float32"),
             (dict(target=args["target"][:, :3]), "target must be"),
             (dict(w_out=args["w_out"][:, :, :7]), "w_out must be"),
             (dict(grad_in=torch.zeros_like(args["w_in"])), "both be tensors or both be None"),
             (dict(chunk_size=0), "chunk_size must be"), (dict(chunk_size=65), "C <= 64"),
             (dict(pos=-1), "pos must be"), (dict(activation="relu"), "activation must be"),
             (dict(lr="0.1"), "lr must be a finite number")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kw)


@needs_cuda
def test_realistic_size_on_gpu():
    """B=4, T=1000 (not a multiple of C), D=128, hidden=512, C=16, starting mid-chunk."""
    assert_close(errors_vs_oracle(B=4, T=1000, D=128, hidden=512, C=16, pos=5, carry=True,
                                  lr=0.001), 1e-4, "realistic")


@needs_kernels
def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) through fused_fast_level and its backward (aot_eager: the
    graph capture and the custom ops' fake kernels, without codegen) == eager."""
    x = make_inputs(2, 10, 16, 32, carry=False)

    def loss(a, target, w_in, w_out):
        y, w_in, w_out, grad_in, grad_out, _ = triton_cms.fused_fast_level(
            a, target, w_in, w_out, None, None, 3, 4, 0.02, "gelu")
        return (y * a).sum() + w_in.sum() + (grad_out * w_out).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [x[n].float().requires_grad_() for n in ("a", "target", "w_in", "w_out")]
        value = fn(*leaves)
        results.append([value, *torch.autograd.grad(value, leaves)])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_fake_implementations_match_strides_of_permuted_inputs():
    """The ops make their inputs contiguous, so every output is row-major whatever the
    inputs' strides: the fake implementations must say the same, the backward op's included."""
    def transposed(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    x = make_inputs(1, 7, 16, 16, carry=True)
    args = [transposed(x[n].float()) for n in ("a", "target") + STATE]
    fake_only = ("test_schema", "test_faketensor")
    fwd = torch.ops.nested_learning.cms_fast_level_fwd.default
    options = (3, 4, 0.02, "silu")
    torch.library.opcheck(fwd, (*args, *options, False), test_utils=fake_only)
    with torch.no_grad():
        y, w1f, w2f, g1o, g2o, w1s, w2s, err = fwd(*args, *options, True)
    grads = [transposed(torch.randn_like(t)) for t in (y, w1f, w2f, g1o, g2o)]
    torch.library.opcheck(torch.ops.nested_learning.cms_fast_level_bwd.default,
                          (args[0], w1s, w2s, err, *grads, *options), test_utils=fake_only)
