"""The step budget's Triton loop (kernels/triton_budget.py) against memory.chunk_step_budget's
PyTorch loop run in float64: the capped learning rates, the spent matrix left mid-chunk and
the gradients of the keys, learning rates and keeps, over segments that start and end
mid-chunk, at chunk lengths that are and are not powers of two; exact ties of the min and
spent budgets (relu at 0) against the PyTorch loop in fp32; the custom ops' opcheck; the
Titans layer's dispatch.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), fp32, tiny sizes;
with one, also a Titans-760M-like shape.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import CUDA, DEVICE, needs_cuda, triton_kernels_or_skip

needs_kernels = triton_kernels_or_skip()

from kernels import triton_budget  # noqa: E402
from memory import chunk_step_budget  # noqa: E402
from test_titans import budget_inputs  # noqa: E402

pytestmark = needs_kernels


def run_budget(k, lr, keep, pos, splits, chunk, backend, dtype, spent=None):
    """chunk_step_budget over `splits` of the sequence (the spent matrix carried), in `dtype`;
    returns (lr', P at the end, gradients of sum <lr', c> + sum P w.r.t. k, lr, keep[, spent])."""
    leaves = [t.to(DEVICE, dtype).detach().requires_grad_() for t in (k, lr, keep)]
    if spent is not None:
        leaves.append(spent.to(DEVICE, dtype).detach().requires_grad_())
    kk, ll, kp = leaves[:3]
    P, got, at = (leaves[3] if spent is not None else None), [], 0
    for n in splits:
        part, P = chunk_step_budget(kk[:, at:at + n], ll[:, at:at + n], kp[:, at:at + n], P, pos + at,
                                    chunk, 0.5, backend)
        got.append(part)
        at += n
    got = torch.cat(got, 1)
    cot = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = (got * cot.to(DEVICE, dtype)).sum() + (0 if P is None else P.sum())
    return got, P, torch.autograd.grad(loss, leaves)


def assert_close(got, want, tol):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk, pos, splits", [(8, 0, [37]), (8, 5, [8, 13, 16]), (12, 3, [7, 30]),
                                                (16, 0, [32])])
def test_kernel_matches_the_torch_loop(chunk, pos, splits):
    """Segments that start and end mid-chunk (the spent matrix carried, and left by the last
    one unless it ends on a boundary), C = 12 masked in a 16-token tile. The budget binds and
    sometimes runs out, so both branches of the min carry gradients."""
    k, lr, keep = budget_inputs(sum(splits))
    want, want_P, want_grads = run_budget(k, lr, keep, pos, splits, chunk, "torch", torch.float64)
    got, P, grads = run_budget(k, lr, keep, pos, splits, chunk, "triton", torch.float32)
    assert (want < lr.to(want) - 1e-3).any() and (want == 0).any()
    assert_close(got, want, 2e-6)
    assert (P is None) == (want_P is None)
    if P is not None:
        assert_close(P, want_P, 2e-6)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, 1e-5)


def test_ties_and_spent_budgets_follow_torch():
    """A key repeated through the chunk (after its first token the budget is spent exactly:
    relu at 0), a step equal to the budget (a tie of the min: half the gradient to each side)
    and a budget already spent before the segment: values and gradients (spent's included)
    equal to the PyTorch loop in fp32."""
    key = F.normalize(torch.randn(1, 1, 2, 8, generator=torch.Generator().manual_seed(4),
                                  dtype=torch.float64), dim=-1)
    k = key.expand(1, 16, 2, 8).clone()
    lr = torch.full((1, 16, 2), 0.3, dtype=torch.float64)
    lr[0, 0, 1] = 0.25                                        # step 0.25 / 0.5 = 0.5 = the budget
    keep = torch.full((1, 16, 2), 0.5, dtype=torch.float64)
    spent = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    for spent_before in (None, spent):
        want = run_budget(k, lr, keep, 0, [11], 16, "torch", torch.float32, spent_before)
        got = run_budget(k, lr, keep, 0, [11], 16, "triton", torch.float32, spent_before)
        assert_close(got[0], want[0], 1e-6)
        assert_close(got[1], want[1], 1e-6)
        for g, w in zip(got[2], want[2]):
            assert_close(g, w, 1e-6)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementations, autograd registration: what torch.compile relies on."""
    g = torch.Generator().manual_seed(0)
    wanted = torch.rand(3, 5, generator=g).to(DEVICE).requires_grad_()
    used = (0.2 * torch.rand(3, 5, generator=g)).to(DEVICE).requires_grad_()
    overlap = torch.rand(3, 5, 5, generator=g).to(DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.nested_learning.step_budget_fwd.default, (wanted, used, overlap, 0.5))


@pytest.mark.parametrize("shape, dtype, message", [
    ((2, 129), torch.float32, "the step-budget kernel holds chunks of at most 128 tokens; got 129"),
    ((2, 8), torch.float64, "wanted must be float32 for the step-budget kernel; got torch.float64"),
])
def test_bad_inputs_raise_one_line_errors(shape, dtype, message):
    x = torch.zeros(shape, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError) as e:
        triton_budget.capped_steps(x, x, torch.zeros(*shape, shape[-1], dtype=dtype, device=DEVICE), 0.5)
    assert str(e.value) == message


@pytest.mark.parametrize("kernels, calls", [("triton", 1), ("torch", 0)])
def test_titans_layer_runs_the_kernel_with_the_triton_backend(kernels, calls, monkeypatch):
    """model.kernels=triton: a Titans layer with a step budget caps its steps in the kernel;
    the torch backend keeps the PyTorch loop."""
    from config import ModelConfig, TitansConfig
    from titans import LongTermMemory
    seen = []
    real = triton_budget.capped_steps
    monkeypatch.setattr(triton_budget, "capped_steps", lambda *a: seen.append(1) or real(*a))
    cfg = ModelConfig(arch="titans", d_model=16, n_head=2, kernels=kernels,
                      titans=TitansConfig(chunk_size=8, step_budget=0.5, memory_depth=1))
    torch.manual_seed(0)
    layer = LongTermMemory(cfg).to(DEVICE)
    y, state = layer(torch.randn(1, 11, 16, device=DEVICE))
    assert len(seen) == calls and state["spent"] is not None and torch.isfinite(y).all()


def test_kernel_bench_budget_rows(capsys):
    """bench/kernels.py --parts budget: the PyTorch and Triton loops, forward and
    forward+backward, at fp32 error against the float64 loop."""
    from bench import kernels as bench
    assert bench.main(["--quick", "--parts", "budget", "--fp32-matmul-precision", "highest"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("budget/")]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("budget/C8", impl, p) for impl in ("torch", "triton")
                                                        for p in ("fwd", "fwd+bwd")]
    assert all(float(r[8]) < 1e-5 for r in rows), rows


@needs_cuda
def test_cuda_titans_like_shape():
    """Titans-760M's memory (chunk 64, d 64; 8 heads here) over 4K tokens from mid-chunk."""
    k, lr, keep = budget_inputs(4100, H=8, d=64)
    want, want_P, want_grads = run_budget(k, lr, keep, 7, [4100], 64, "torch", torch.float64)
    got, P, grads = run_budget(k, lr, keep, 7, [4100], 64, "triton", torch.float32)
    assert_close(got, want, 1e-4)
    assert_close(P, want_P, 1e-4)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, 1e-3)
    assert CUDA


def test_fake_implementations_match_strides_of_permuted_inputs():
    """The ops make their inputs contiguous, so their outputs are row-major whatever the
    inputs' strides: the fake implementations must say the same, the backward op's included."""
    g = torch.Generator().manual_seed(0)
    wanted, used = (torch.rand(5, 3, generator=g).to(DEVICE).t() for _ in range(2))
    overlap = torch.rand(5, 5, 3, generator=g).to(DEVICE).permute(2, 0, 1)
    fake_only = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.nested_learning.step_budget_fwd.default,
                          (wanted, used, overlap, 0.5), test_utils=fake_only)
    e, seen = torch.ops.nested_learning.step_budget_fwd(wanted, used, overlap, 0.5)
    grad_e = torch.rand(5, 3, generator=g).to(DEVICE).t()
    torch.library.opcheck(torch.ops.nested_learning.step_budget_bwd.default,
                          (wanted, overlap, e, seen, grad_e, 0.5), test_utils=fake_only)


def test_cpu_tensors_without_the_interpreter_raise_one_line(monkeypatch):
    """Like the other Triton entries: CPU tensors with no interpreter get one line naming
    the kernels, not Triton's driver error from the launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError) as e:
        triton_budget.capped_steps(x, x, torch.zeros(2, 8, 8), 0.5)
    assert str(e.value) == ("the step-budget kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                            "before importing triton); got device cpu")
    with pytest.raises(ValueError, match="used must be on wanted's device"):
        triton_budget.capped_steps(x.to("meta"), x, torch.zeros(2, 8, 8, device="meta"), 0.5)
