"""The fused HOPE stage-1 kernels (kernels/triton_hope.py), with M_mem on the fused MLP kernel
(kernels/triton_mlp_memory.py, self-generated targets), against hope.py's per-chunk path
run in float64: the whole mixer's output, every state (M_mem, the stacked projection
memories' weights and chunk-start weights) and the gradients of the input and of every
parameter, over segments that cut C_other mid-chunk (the piece up to the boundary takes the
per-chunk path, the rest the kernel).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), fp32, tiny sizes;
with one, also a paper-like shape in tf32.
"""
import copy

import pytest
import torch

from helpers import CUDA, DEVICE, fp32_matmul_precision, needs_cuda, triton_kernels_or_skip

needs_kernels = triton_kernels_or_skip()

from kernels import triton_hope, triton_mlp_memory  # noqa: E402
from test_triton_memory import assert_close  # noqa: E402


def make_mixers(d_model=16, n_head=1, chunk_other=4, chunk_mem=8, seed=0, **hope):
    """(fused: model.kernels=triton, fp32; oracle: its float64 copy on the torch path)."""
    from config import HopeConfig, ModelConfig
    from hope import SelfModifyingTitans
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=d_model, n_head=n_head, kernels="triton",
                      hope=HopeConfig(chunk_other=chunk_other, chunk_mem=chunk_mem, memory_expansion=1, **hope))
    fused = SelfModifyingTitans(cfg).to(DEVICE)
    oracle = copy.deepcopy(fused).double()
    for mem in (oracle.projections, oracle.memory):
        mem.backend = "torch"
    return fused, oracle


def run(mixer, x, segments, dtype):
    """The mixer over `segments` of x (streaming its state), then the gradients of
    sum <outputs, fixed random cotangents> (y and every state) with respect to x and every
    parameter: (outputs, gradients)."""
    xs, state, ys, pos = x.to(dtype).requires_grad_(), None, [], 0
    for length in segments:
        y, state = mixer(xs[:, pos:pos + length], state, pos=pos)
        ys.append(y)
        pos += length
    proj, mem = state["projections"], state["memory"]
    assert proj["pos"] == mem["pos"] == pos
    outs = [torch.cat(ys, 1), *proj["weights"], *proj["chunk_start"], *mem["weights"], *mem["chunk_start"]]
    gen = torch.Generator().manual_seed(2)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)).sum()
               for o in outs)
    return outs, torch.autograd.grad(loss, [xs, *mixer.parameters()])


def compare(segments, B=1, d_model=16, n_head=1, tol=2e-5, **options):
    fused, oracle = make_mixers(d_model, n_head, **options)
    x = torch.randn(B, sum(segments), d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_outs, ref_grads = run(oracle, x, segments, torch.float64)
    outs, grads = run(fused, x, segments, torch.float32)
    err = lambda a, r: ((a.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()  # noqa: E731
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    errors = {f"out{i}": err(a, r) for i, (a, r) in enumerate(zip(outs, ref_outs))}
    errors.update({"d" + n: err(a, r) for n, a, r in zip(names, grads, ref_grads)})
    assert {"dx", "deta_weight", "dalpha_bias", "dprojections.init_weights.0"} <= set(errors)
    assert_close(errors, tol, f"HOPE stage 1 fused {segments} {options}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The lengths of the segments the fused stage 1 took."""
    calls = []
    real = triton_hope.fused_hope_projections
    monkeypatch.setattr(triton_hope, "fused_hope_projections",
                        lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    return calls


@pytest.fixture
def memory_kernel_calls(monkeypatch):
    """(dtype, self_target) of each launch of the fused MLP kernel (M_mem, stage 1's pieces
    before a C_other boundary)."""
    calls = []
    real = triton_mlp_memory.fused_mlp_memory_delta
    monkeypatch.setattr(triton_mlp_memory, "fused_mlp_memory_delta",
                        lambda *a, **kw: calls.append((a[0].dtype, kw["self_target"])) or real(*a, **kw))
    return calls


@needs_kernels
@pytest.mark.parametrize("segments, options", [
    ([19], {}),                                              # from t = 0, a ragged last chunk
    ([7, 6, 6], {}),                                         # segments that start mid-chunk
    ([5, 9], dict(inner_opt="gd", activation="gelu")),
    ([13], dict(max_grad_norm=0.5, eta_max=0.3)),            # the clip bites (tau small)
], ids=["whole", "segments", "gd-gelu", "clip"])
@pytest.mark.slow
def test_fused_stage1_matches_per_chunk_path(kernel_calls, memory_kernel_calls, segments, options):
    compare(segments, **options)
    # M_mem (stage 2) took the fused MLP kernel with in-kernel self-generated targets; the
    # float64 oracle (torch path) never reached a kernel
    assert memory_kernel_calls and all(c == (torch.float32, True) for c in memory_kernel_calls)
    # the kernel took each segment's tokens after its first C_other boundary
    C, pos, expected = 4, 0, []
    for length in segments:
        head = min((C - pos % C) % C, length)
        if length > head:
            expected.append(length - head)
        pos += length
    assert kernel_calls == expected


@needs_kernels
@pytest.mark.slow
def test_two_heads_and_a_batch(kernel_calls):
    """Per-(batch, head) offsets of the stacked memories (head m*H + h)."""
    compare([11], B=2, d_model=32, n_head=2)
    assert kernel_calls == [11]


@needs_kernels
@pytest.mark.slow
def test_head_dim_not_a_power_of_two(kernel_calls):
    """Head dim 12 (d_model 24, 2 heads): [., 16] tiles whose last 4 columns are masked
    (cols < D) and per-head offsets in units of D, not of the tile width BD (they coincide
    at the other tests' head dim 16). Kills e.g. the forward reading head h's rows of x at
    offset h * BD (the B = H = 2 test at head dim 16 passes it)."""
    compare([11], d_model=24, n_head=2)
    assert kernel_calls == [11]


@needs_kernels
@pytest.mark.slow
def test_other_projection_sets_keep_the_per_chunk_path(kernel_calls):
    for changes in (dict(adaptive_q=True), dict(retention=False), dict(inner_lr_fixed=0.1),
                    dict(detach_targets=True)):
        mixer, _ = make_mixers(**changes)
        mixer(torch.randn(1, 9, 16, device=DEVICE))
        assert not kernel_calls, f"fused stage 1 used with {changes}"


def _kernel_args(B=1, T=5, H=1, d=8):
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)   # noqa: E731
    n = len(triton_hope.PROJECTIONS)
    return [rand(B, T, H, d), 0.3 * rand(B, n * H, d, d), 0.3 * rand(B, n * H, d, d), rand(H, d),
            rand(H), rand(H, d), rand(H)]


@needs_kernels
def test_no_grad_forward_matches_and_saves_no_chunk_states():
    args = _kernel_args()
    with torch.no_grad():
        outs = triton_hope.fused_hope_projections(*args, 0.1, 4)
        raw = torch.ops.nested_learning.hope_projections_fwd(*args, 0.1, 4, True, "silu", 0.0, 0)
    leaves = [a.clone().requires_grad_() for a in args]
    with_grad = triton_hope.fused_hope_projections(*leaves, 0.1, 4)
    flat = lambda o: [*o[:4], *o[4], *o[5]]  # noqa: E731
    assert all(torch.equal(a, b.detach()) for a, b in zip(flat(outs), flat(with_grad)))
    assert raw[-1].numel() == 0 and raw[-2].numel() == 0


@needs_kernels
@pytest.mark.parametrize("save_every", (1, 2))
@pytest.mark.slow
def test_custom_ops_pass_opcheck(save_every):
    """Schema, fake implementations, autograd registration: what torch.compile relies on (with
    save_every 2, the backward's per-block recompute too)."""
    args = [a.clone().requires_grad_() for a in _kernel_args()]
    chunk = 4 if save_every == 1 else 2         # T = 5: 2 chunks / 3 chunks in 2 blocks
    torch.library.opcheck(torch.ops.nested_learning.hope_projections_fwd.default,
                          (*args, 0.1, chunk, True, "gelu", 2.0, save_every))


@pytest.fixture
def recompute_blocks(monkeypatch):
    """Every fused memory op keeps every 2nd chunk start (triton_mlp_memory.save_interval) and
    recomputes the rest in its backward; yields the (op, t0, t1) blocks the backwards ran."""
    seen = []
    monkeypatch.setattr(triton_mlp_memory, "save_interval", lambda n_chunks: 2)
    for module in (triton_hope, triton_mlp_memory):
        real = module.backward_in_blocks

        def spy(T, C, every, seq_grads, carried, start_grads, step, real=real, name=module.__name__):
            return real(T, C, every, seq_grads, carried, start_grads,
                        lambda i_s, t0, t1, *grads: seen.append((name.split(".")[-1], t0, t1))
                        or step(i_s, t0, t1, *grads))
        monkeypatch.setattr(module, "backward_in_blocks", spy)
    return seen


@needs_kernels
@pytest.mark.slow
def test_mixer_with_recomputed_chunk_starts_matches_per_chunk_path(kernel_calls, recompute_blocks):
    """Stage 1 (C_other 4: chunks [0,4) .. [16,19), blocks of 2) and M_mem (C_mem 8: three
    chunks) through the backward's per-block recompute, against the float64 per-chunk path."""
    compare([19])
    assert kernel_calls == [19]
    assert [b for b in recompute_blocks if b[0] == "triton_hope"] == [
        ("triton_hope", 16, 19), ("triton_hope", 8, 16), ("triton_hope", 0, 8)]
    assert [b for b in recompute_blocks if b[0] == "triton_mlp_memory"] == [
        ("triton_mlp_memory", 16, 19), ("triton_mlp_memory", 0, 16)]


@needs_kernels
@pytest.mark.slow
def test_recomputed_chunk_starts_match_saving_every_chunk():
    """fused_hope_projections with state_every 2 (3 chunks, the last ragged: blocks of 2 and
    1): outputs and every gradient equal state_every 1's."""
    args = _kernel_args(T=9)

    def run(every):
        leaves = [a.clone().requires_grad_() for a in args]
        k, v, eta, alpha, final, start = triton_hope.fused_hope_projections(
            *leaves, 0.5, 4, max_grad_norm=2.0, state_every=every)
        outs = [k, v, eta, alpha, *final, *start]
        gen = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(DEVICE)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, leaves))

    saved_all = run(1)
    for a, b in zip(run(2), saved_all):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index, value, message", [
    (0, torch.zeros(1, 5, 8), r"x must be \[B,T,H,d\]"),
    (1, torch.zeros(1, 3, 8, 8), r"w_in must be \[B,4H,E,d\]"),
    (2, torch.zeros(1, 4, 8, 16), r"w_out must be \[B,4H,d,E\] = \[1, 4, 8, 8\]"),
    (3, torch.zeros(2, 8), r"eta_weight must be \[H,d\]"),
    (6, torch.zeros(2), r"alpha_bias must be \[H\]"),
    (0, torch.zeros(1, 5, 1, 8, dtype=torch.bfloat16), "x must be float32 for fused_hope_projections"),
])
def test_bad_inputs_raise_one_line_errors(index, value, message):
    args = _kernel_args()
    args[index] = value.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_hope.fused_hope_projections(*args, 0.1, 4)


def test_fusable_projections_limits():
    fusable = triton_hope.fusable_projections
    assert fusable(64, 1, 16) and fusable(64, 1, 64) and fusable(64, 2, 64) and fusable(128, 1, 16)
    assert not fusable(128, 1, 32) and not fusable(64, 1, 65) and not fusable(128, 2, 16)


def test_bad_options_raise_one_line_errors():
    args = _kernel_args()
    with pytest.raises(ValueError, match="chunk_size 65"):
        triton_hope.fused_hope_projections(*args, 0.1, 65)
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_hope.fused_hope_projections(*args, 0.1, 4, activation="relu")
    for bad in (0.0, "3"):
        with pytest.raises(ValueError, match="max_grad_norm must be None or a finite number > 0"):
            triton_hope.fused_hope_projections(*args, 0.1, 4, max_grad_norm=bad)
    with pytest.raises(ValueError, match="state_every must be None or a positive int; got 0"):
        triton_hope.fused_hope_projections(*args, 0.1, 4, state_every=0)


@needs_cuda
def test_cuda_paper_like_shape_in_tf32(kernel_calls):
    """hope_760m's head (d = E = 64, C_other 16, C_mem 64, inner clip 1; 4 heads here) at
    T = 1000 in tf32: outputs, states and every gradient. At HopeConfig's default clip 3 the
    layer amplifies any rounding (a 1e-3 change of its input moves its output by 0.6 after
    400 tokens at this shape, 1e-3 at clip 1; BENCHMARKS.md, 2026-11-27), which no tf32
    kernel could match."""
    with fp32_matmul_precision("high"):
        compare([1000], B=2, d_model=256, n_head=4, chunk_other=16, chunk_mem=64, max_grad_norm=1.0,
                tol=2e-2)
    assert kernel_calls == [1000] and CUDA
