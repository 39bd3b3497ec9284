"""Triton forward+backward kernels for the loop of Titans' step budget
(`memory.chunk_step_budget`, our stabiliser; docs/FIDELITY.md, Titans choice 14).

Within one chunk of C tokens, with w_j the uncapped step of token j, u the amount the chunk
has spent along each of its keys (u_i = k_i^T P k_i; at a segment's start, what the
previous segment left) and O_ij = (k_i . k_j)^2:

    e_j = min(w_j, relu(b - u_j)),    u <- u + e_j O[:, j]           (j = 0 .. C-1, in order)

memory.py's PyTorch loop is the reference and the CPU path; on CUDA it launches a handful of
small kernels per token of the chunk, forward and backward, in every layer. Here one program
per (sequence, chunk, head) runs the whole loop with its O [C, C] in registers.

Backward, the loop reversed, with du the gradient of u after step j (zero after the last):
    de_j = g_j + du . O[:, j],    dO[:, j] = e_j du,
    e_j = min(w_j, r_j), r_j = relu(b - u_j): de_j goes to the smaller of w_j and r_j (half
    to each at a tie, as torch.minimum), and du_j -= (r_j's share) where b - u_j > 0 (relu'
    is 0 at 0, as torch's).
The forward saves u_j, the amount token j saw, for that.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import MAX_BUDGET_CHUNK, check_tensors
from .triton_delta import (_load_gate, _load_rows, _pick, _store_gate, _store_rows, jit_any_length,
                           on_input_device)


@triton.jit
def _column(x, idx, j):
    """x[:, j] of a [BC, BC] tile."""
    return tl.sum(tl.where(idx[None, :] == j, x, 0.0), 1)


@jit_any_length
def _budget_fwd_kernel(w_ptr, u0_ptr, o_ptr, e_ptr, seen_ptr, budget, C, BC: tl.constexpr):
    """The loop forward, one program per row (a sequence's chunk of one head): the capped
    steps e and the amount u_j each token saw."""
    vec = tl.program_id(0).to(tl.int64) * C            # this row's [C] vectors
    tile = vec * C                                     # and its [C, C] overlaps
    idx = tl.arange(0, BC)
    w = _load_gate(w_ptr, vec, 0, C, 1, 0.0, BC)
    u = _load_gate(u0_ptr, vec, 0, C, 1, 0.0, BC)
    overlap = _load_rows(o_ptr, tile, 0, C, C, 0, C, BC, BC)
    e = tl.zeros([BC], dtype=tl.float32)
    seen = tl.zeros([BC], dtype=tl.float32)
    for j in range(C):
        u_j = _pick(u, idx, j)
        e_j = tl.minimum(_pick(w, idx, j), tl.maximum(budget - u_j, 0.0))
        u += e_j * _column(overlap, idx, j)
        e = tl.where(idx == j, e_j, e)
        seen = tl.where(idx == j, u_j, seen)
    _store_gate(e_ptr, vec, 0, C, 1, e, BC)
    _store_gate(seen_ptr, vec, 0, C, 1, seen, BC)


@jit_any_length
def _budget_bwd_kernel(w_ptr, o_ptr, e_ptr, seen_ptr, de_ptr, dw_ptr, du0_ptr, do_ptr, budget,
                       C, BC: tl.constexpr):
    """The loop reversed (module docstring): gradients of w, of the starting u and of O."""
    vec = tl.program_id(0).to(tl.int64) * C            # this row's [C] vectors
    tile = vec * C                                     # and its [C, C] overlaps
    idx = tl.arange(0, BC)
    w = _load_gate(w_ptr, vec, 0, C, 1, 0.0, BC)
    e = _load_gate(e_ptr, vec, 0, C, 1, 0.0, BC)
    seen = _load_gate(seen_ptr, vec, 0, C, 1, 0.0, BC)
    g = _load_gate(de_ptr, vec, 0, C, 1, 0.0, BC)
    overlap = _load_rows(o_ptr, tile, 0, C, C, 0, C, BC, BC)
    du = tl.zeros([BC], dtype=tl.float32)
    dw = tl.zeros([BC], dtype=tl.float32)
    d_overlap = tl.zeros([BC, BC], dtype=tl.float32)
    for step in range(C):
        j = C - 1 - step
        e_j = _pick(e, idx, j)
        de_j = _pick(g, idx, j) + tl.sum(du * _column(overlap, idx, j), 0)
        d_overlap = tl.where(idx[None, :] == j, du[:, None] * e_j, d_overlap)
        w_j = _pick(w, idx, j)
        slack = budget - _pick(seen, idx, j)
        r_j = tl.maximum(slack, 0.0)
        to_w = tl.where(w_j < r_j, 1.0, tl.where(w_j > r_j, 0.0, 0.5))
        dw = tl.where(idx == j, de_j * to_w, dw)
        dr = tl.where(slack > 0.0, de_j * (1.0 - to_w), 0.0)                # relu' = 0 at 0
        du = tl.where(idx == j, du - dr, du)
    _store_gate(dw_ptr, vec, 0, C, 1, dw, BC)
    _store_gate(du0_ptr, vec, 0, C, 1, du, BC)
    _store_rows(do_ptr, tile, 0, C, C, 0, C, d_overlap, BC, BC)


def _launch(C):
    """(grid constexprs, warps): the token tile covers the chunk; more warps for O at C > 64."""
    BC = max(16, triton.next_power_of_2(C))
    return dict(BC=BC), 8 if BC > 64 else 4


@torch.library.custom_op("nested_learning::step_budget_fwd", mutates_args=())
@on_input_device
def _step_budget_fwd(wanted: Tensor, used: Tensor, overlap: Tensor,
                     budget: float) -> tuple[Tensor, Tensor]:
    wanted, used, overlap = wanted.contiguous(), used.contiguous(), overlap.contiguous()
    e, seen = torch.empty_like(wanted), torch.empty_like(wanted)
    N, C = wanted.shape
    if N and C:
        consts, warps = _launch(C)
        _budget_fwd_kernel[(N,)](wanted, used, overlap, e, seen, budget, C, **consts,
                                 num_warps=warps)
    return e, seen


@_step_budget_fwd.register_fake
def _(wanted, used, overlap, budget):
    # row-major like the op's outputs (it makes its inputs contiguous first)
    return wanted.new_empty(wanted.shape), wanted.new_empty(wanted.shape)


@torch.library.custom_op("nested_learning::step_budget_bwd", mutates_args=())
@on_input_device
def _step_budget_bwd(wanted: Tensor, overlap: Tensor, e: Tensor, seen: Tensor, grad_e: Tensor,
                     budget: float) -> tuple[Tensor, Tensor, Tensor]:
    wanted, overlap, grad_e = wanted.contiguous(), overlap.contiguous(), grad_e.contiguous()
    dw, du0, d_overlap = torch.empty_like(wanted), torch.empty_like(wanted), torch.empty_like(overlap)
    N, C = wanted.shape
    if N and C:
        consts, warps = _launch(C)
        _budget_bwd_kernel[(N,)](wanted, overlap, e, seen, grad_e, dw, du0, d_overlap, budget, C,
                                 **consts, num_warps=warps)
    return dw, du0, d_overlap


@_step_budget_bwd.register_fake
def _(wanted, overlap, e, seen, grad_e, budget):
    return wanted.new_empty(wanted.shape), wanted.new_empty(wanted.shape), overlap.new_empty(overlap.shape)


def _setup_context(ctx, inputs, output):
    wanted, used, overlap, budget = inputs
    ctx.save_for_backward(wanted, overlap, *output)
    ctx.budget = budget
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_e, _grad_seen):
    wanted, overlap, e, seen = ctx.saved_tensors
    grad_e = torch.zeros_like(e) if grad_e is None else grad_e
    dw, du0, d_overlap = torch.ops.nested_learning.step_budget_bwd(wanted, overlap, e, seen,
                                                                    grad_e, ctx.budget)
    return dw, du0, d_overlap, None


_step_budget_fwd.register_autograd(_backward, setup_context=_setup_context)


def capped_steps(wanted, used, overlap, budget):
    """The budget loop over each chunk (module docstring): wanted, used [..., C] fp32 (the
    uncapped steps, the amounts spent before the chunk's first token), overlap [..., C, C]
    fp32 ((k_i . k_j)^2). Returns the capped steps e [..., C]."""
    C = wanted.shape[-1]
    if C > MAX_BUDGET_CHUNK:
        raise ValueError(f"the step-budget kernel holds chunks of at most {MAX_BUDGET_CHUNK} tokens; got {C}")
    for name, t in (("wanted", wanted), ("used", used), ("overlap", overlap)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 for the step-budget kernel; got {t.dtype}")
    # one device, and CUDA (or the interpreter): the one-line message of the other entries
    check_tensors({"wanted": wanted, "used": used, "overlap": overlap}, "wanted",
                  kernels="the step-budget kernels")
    # the kernels index all three by wanted's rows: a smaller used / overlap would be read
    # past its end (reshape(-1, C) below accepts any tensor whose size C divides)
    for name, t, shape in (("used", used, [*wanted.shape]), ("overlap", overlap, [*wanted.shape, C])):
        if list(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} to match wanted {list(wanted.shape)}; "
                             f"got {list(t.shape)}")
    lead = wanted.shape[:-1]
    e, _ = torch.ops.nested_learning.step_budget_fwd(
        wanted.reshape(-1, C), used.reshape(-1, C), overlap.reshape(-1, C, C), float(budget))
    return e.view(*lead, C)
