"""The fused HOPE stage-1 kernel (kernels/triton_hope.py, inference only) against hope.py's
per-chunk path run in float64: the whole mixer's output and every state (M_mem, the stacked
projection memories' weights and chunk-start weights), over segments that cut C_other
mid-chunk (the piece up to the boundary takes the per-chunk path, the rest the kernel).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), fp32, tiny sizes;
with one, also a paper-like shape in tf32.
"""
import copy

import pytest
import torch

from helpers import CUDA, DEVICE, fp32_matmul_precision, needs_cuda, triton_kernels_or_skip

needs_kernels = triton_kernels_or_skip()

from kernels import triton_hope  # noqa: E402
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
    """The mixer over `segments` of x (streaming its state): (y, flat list of state tensors)."""
    xs, state, ys, pos = x.to(dtype), None, [], 0
    for length in segments:
        y, state = mixer(xs[:, pos:pos + length], state, pos=pos)
        ys.append(y)
        pos += length
    proj, mem = state["projections"], state["memory"]
    assert proj["pos"] == mem["pos"] == pos
    return torch.cat(ys, 1), [*proj["weights"], *proj["chunk_start"], *mem["weights"], *mem["chunk_start"]]


def compare(segments, B=1, d_model=16, n_head=1, tol=2e-5, **options):
    fused, oracle = make_mixers(d_model, n_head, **options)
    x = torch.randn(B, sum(segments), d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ref_y, ref_states = run(oracle, x, segments, torch.float64)
        y, states = run(fused, x, segments, torch.float32)
    err = lambda a, r: ((a.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()  # noqa: E731
    errors = {"y": err(y, ref_y), **{f"state{i}": err(a, r) for i, (a, r) in enumerate(zip(states, ref_states))}}
    assert_close(errors, tol, f"HOPE stage 1 fused {segments} {options}")


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = triton_hope.fused_hope_projections
    monkeypatch.setattr(triton_hope, "fused_hope_projections",
                        lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    return calls


@needs_kernels
@pytest.mark.parametrize("segments, options", [
    ([19], {}),                                              # from t = 0, a ragged last chunk
    ([7, 6, 6], {}),                                         # segments that start mid-chunk
    ([5, 9], dict(inner_opt="gd", activation="gelu")),
    ([13], dict(max_grad_norm=0.5)),                         # the clip bites (tau small)
], ids=["whole", "segments", "gd-gelu", "clip"])
def test_fused_stage1_matches_per_chunk_path(kernel_calls, segments, options):
    compare(segments, **options)
    # the kernel took each segment's tokens after its first C_other boundary
    C, pos, expected = 4, 0, []
    for length in segments:
        head = min((C - pos % C) % C, length)
        if length > head:
            expected.append(length - head)
        pos += length
    assert kernel_calls == expected


@needs_kernels
def test_two_heads_and_a_batch(kernel_calls):
    """Per-(batch, head) offsets of the stacked memories (head m*H + h)."""
    compare([11], B=2, d_model=32, n_head=2)
    assert kernel_calls == [11]


@needs_kernels
def test_training_keeps_the_per_chunk_path(kernel_calls):
    fused, _ = make_mixers()
    fused(torch.randn(1, 9, 16, device=DEVICE))           # grad enabled: no backward in the kernel
    assert not kernel_calls
    for changes in (dict(adaptive_q=True), dict(retention=False), dict(inner_lr_fixed=0.1)):
        mixer, _ = make_mixers(**changes)
        with torch.no_grad():
            mixer(torch.randn(1, 9, 16, device=DEVICE))
        assert not kernel_calls, f"fused stage 1 used with {changes}"


def _kernel_args(B=1, T=5, H=1, d=8):
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)   # noqa: E731
    n = len(triton_hope.PROJECTIONS)
    return [rand(B, T, H, d), 0.3 * rand(B, n * H, d, d), 0.3 * rand(B, n * H, d, d), rand(H, d),
            rand(H), rand(H, d), rand(H)]


@needs_kernels
def test_refuses_inputs_that_need_gradients():
    args = _kernel_args()
    args[1].requires_grad_()
    with pytest.raises(RuntimeError, match="fused_hope_projections has no backward"):
        triton_hope.fused_hope_projections(*args, 0.1, 4)
    with torch.no_grad():
        assert triton_hope.fused_hope_projections(*args, 0.1, 4)[0].shape == args[0].shape


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


def test_bad_options_raise_one_line_errors():
    args = _kernel_args()
    with pytest.raises(ValueError, match="chunk_size 65"):
        triton_hope.fused_hope_projections(*args, 0.1, 65)
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_hope.fused_hope_projections(*args, 0.1, 4, activation="relu")
    with pytest.raises(ValueError, match="max_grad_norm must be None or a finite number > 0"):
        triton_hope.fused_hope_projections(*args, 0.1, 4, max_grad_norm=0.0)


@needs_cuda
def test_cuda_paper_like_shape_in_tf32(kernel_calls):
    """hope_760m's head (d = E = 64, C_other 16, C_mem 64; 4 heads here) at T = 1000 in tf32."""
    with fp32_matmul_precision("high"):
        compare([1000], B=2, d_model=256, n_head=4, chunk_other=16, chunk_mem=64, max_grad_norm=3.0,
                tol=2e-2)
    assert kernel_calls == [1000] and CUDA
