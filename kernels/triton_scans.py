"""Fused Triton forward+backward kernels for the two scan primitives (DESIGN §3.2, §4).

    delta_rule_triton(q, k, u, alpha, eta, initial_state=None, chunk_size=64) -> (o, S_T)
    momentum_rule_triton(q, k, u, alpha, beta, initial_state=None, initial_momentum=None,
                         chunk_size=64) -> (o, S_T, Z_T)

shapes: q, k [B,T,H,K]; u [B,T,H,V]; alpha, eta, beta [B,T,H]; S, Z [B,H,V,K]; o [B,T,H,V].
Inputs may be fp32, bf16 or fp16; the state is accumulated in fp32, `o` comes back in q's
dtype and S_T, Z_T in fp32. Gradients flow to every input, initial states included.
Gates are assumed in range: 0 <= alpha, beta <= 1 and eta >= 0 (log-space ratios rely on it;
a gate of exactly 0 has its log clamped at triton_delta.LOG_GATE_FLOOR and gets gradient 0,
as in kernels/chunked.py).

Each primitive is a pair of `torch.library` custom ops (forward, backward) joined by
`register_autograd`, with fake implementations, so `torch.compile` traces through them
without graph breaks. The kernels are in `triton_delta.py` and `triton_momentum.py`.

The kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is
imported (Triton's interpreter; what the CPU tests use).
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from .checks import check_saved_chunks, check_scan_inputs
from .triton_delta import (_contiguous, _grad_or_zeros, _needs_grad, delta_backward, delta_forward,
                           on_input_device)
from .triton_momentum import momentum_backward, momentum_forward

__all__ = ["delta_rule_triton", "momentum_rule_triton"]

KERNELS = "the Triton kernels"     # how the input check's messages name them


# The longest chunk at K > 64. 32 bounds the chunk-parallel kernels' tiles, at twice the
# sequential steps of fla, whose chunk is 64 at every K. With tf32 products (16-bit inputs, or
# fp32 at matmul precision "high") ptxas (sm_90a, K = V = 128) compiles every kernel at 64
# within shared memory, and the gradient kernel spills less there (4.7 KB per thread against
# 13 KB at 32, where it gets 32 registers); with exact fp32 products two kernels overflow it
# (tests/test_triton_compile.py, KNOWN_SMEM_OVERFLOW), so 64 could serve the tf32 path only.
# Which is faster is for a GPU to say: bench/kernels.py times 64 as impl triton/chunk64.
WIDE_KEY_CHUNK = 32


def _tiles(K, V, chunk_size):
    """(BT, BK, BV). The chunk length BT is chunk_size rounded to a power of two in
    [16, 64] (tl.dot needs >= 16; WIDE_KEY_CHUNK when K > 64): like chunk_size itself it
    changes speed, never the result. V is split into blocks of <= 64 columns (the
    chunk-parallel kernels; the scans autotune theirs on a GPU)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    BT = min(64 if BK <= 64 else WIDE_KEY_CHUNK, max(16, triton.next_power_of_2(chunk_size)))
    return BT, BK, BV


def _saved_shapes(q, u, chunk_size, save):
    """Shapes of the per-chunk states (and of Delta) the forward keeps for the backward."""
    B, T, H, K = q.shape
    V = u.shape[-1]
    BT = _tiles(K, V, chunk_size)[0]
    if not save:
        return (0,), (0,)
    return (B * H, (T + BT - 1) // BT, K, V), (B * H, T, V)


# ----------------------------------------------------------------------------- delta rule

@torch.library.custom_op("nested_learning::delta_rule_fwd", mutates_args=())
@on_input_device
def _delta_rule_fwd(q: Tensor, k: Tensor, u: Tensor, alpha: Tensor, eta: Tensor,
                    initial_state: Optional[Tensor], chunk_size: int,
                    save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, u, alpha, eta, initial_state = _contiguous(q, k, u, alpha, eta, initial_state)
    return tuple(delta_forward(q, k, u, alpha, eta, initial_state, save,
                               *_tiles(q.shape[-1], u.shape[-1], chunk_size)))


@_delta_rule_fwd.register_fake
def _(q, k, u, alpha, eta, initial_state, chunk_size, save):
    B, T, H, K = q.shape
    V = u.shape[-1]
    chunk_states, deltas = _saved_shapes(q, u, chunk_size, save)
    return (q.new_empty(B, T, H, V), q.new_empty(B, H, V, K, dtype=torch.float32),
            q.new_empty(chunk_states, dtype=torch.float32),
            q.new_empty(deltas, dtype=torch.float32))


@torch.library.custom_op("nested_learning::delta_rule_bwd", mutates_args=())
@on_input_device
def _delta_rule_bwd(q: Tensor, k: Tensor, u: Tensor, alpha: Tensor, eta: Tensor,
                    h_chunks: Tensor, delta: Tensor, grad_o: Tensor, grad_state: Tensor,
                    chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, u, alpha, eta, grad_o, grad_state = _contiguous(q, k, u, alpha, eta, grad_o, grad_state)
    return tuple(delta_backward(q, k, u, alpha, eta, h_chunks, delta, grad_o, grad_state,
                                *_tiles(q.shape[-1], u.shape[-1], chunk_size)))


@_delta_rule_bwd.register_fake
def _(q, k, u, alpha, eta, h_chunks, delta, grad_o, grad_state, chunk_size):
    # the op makes its inputs contiguous first: new row-major buffers, not empty_like (which
    # keeps a permuted input's strides)
    return (*(t.new_empty(t.shape) for t in (q, k, u, alpha, eta)),
            grad_state.new_empty(grad_state.shape, dtype=torch.float32))


def _delta_setup_context(ctx, inputs, output):
    q, k, u, alpha, eta, initial_state, chunk_size, save = inputs
    ctx.save_for_backward(q, k, u, alpha, eta, output[2], output[3])
    ctx.chunk_size = chunk_size
    ctx.state_dtype = None if initial_state is None else initial_state.dtype
    ctx.mark_non_differentiable(output[2], output[3])


def _delta_rule_backward(ctx, grad_o, grad_state, _grad_h_chunks, _grad_delta):
    q, k, u, alpha, eta, h_chunks, delta = ctx.saved_tensors
    check_saved_chunks(h_chunks, "delta_rule_triton")
    B, T, H, K = q.shape
    grad_o = _grad_or_zeros(grad_o, (B, T, H, u.shape[-1]), q, q.dtype)
    grad_state = _grad_or_zeros(grad_state, (B, H, u.shape[-1], K), q, torch.float32)
    dq, dk, du, dalpha, deta, ds0 = torch.ops.nested_learning.delta_rule_bwd(
        q, k, u, alpha, eta, h_chunks, delta, grad_o, grad_state, ctx.chunk_size)
    ds0 = None if ctx.state_dtype is None else ds0.to(ctx.state_dtype)
    return dq, dk, du, dalpha, deta, ds0, None, None


_delta_rule_fwd.register_autograd(_delta_rule_backward, setup_context=_delta_setup_context)


def delta_rule_triton(q, k, u, alpha, eta, initial_state=None, chunk_size=64):
    """S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T ;  o_t = S_t q_t  (NL Eq. 57/88,
    the DGD transition). Returns (o [B,T,H,V] in q's dtype, S_T [B,H,V,K] fp32)."""
    check_scan_inputs(q, k, u, {"alpha": alpha, "eta": eta}, {"initial_state": initial_state},
                      chunk_size, kernels=KERNELS)
    save = _needs_grad(q, k, u, alpha, eta, initial_state)
    o, s_final, _, _ = torch.ops.nested_learning.delta_rule_fwd(
        q, k, u, alpha, eta, initial_state, chunk_size, save)
    return o, s_final


# ----------------------------------------------------------------------------- momentum rule

@torch.library.custom_op("nested_learning::momentum_rule_fwd", mutates_args=())
@on_input_device
def _momentum_rule_fwd(q: Tensor, k: Tensor, u: Tensor, alpha: Tensor, beta: Tensor,
                       initial_state: Optional[Tensor], initial_momentum: Optional[Tensor],
                       chunk_size: int,
                       save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, u, alpha, beta, initial_state, initial_momentum = _contiguous(
        q, k, u, alpha, beta, initial_state, initial_momentum)
    return tuple(momentum_forward(q, k, u, alpha, beta, initial_state, initial_momentum, save,
                                  *_tiles(q.shape[-1], u.shape[-1], chunk_size)))


@_momentum_rule_fwd.register_fake
def _(q, k, u, alpha, beta, initial_state, initial_momentum, chunk_size, save):
    B, T, H, K = q.shape
    V = u.shape[-1]
    chunk_states, _ = _saved_shapes(q, u, chunk_size, save)
    return (q.new_empty(B, T, H, V), q.new_empty(B, H, V, K, dtype=torch.float32),
            q.new_empty(B, H, V, K, dtype=torch.float32),
            q.new_empty(chunk_states, dtype=torch.float32),
            q.new_empty(chunk_states, dtype=torch.float32))


@torch.library.custom_op("nested_learning::momentum_rule_bwd", mutates_args=())
@on_input_device
def _momentum_rule_bwd(q: Tensor, k: Tensor, u: Tensor, alpha: Tensor, beta: Tensor,
                       h_chunks: Tensor, z_chunks: Tensor, grad_o: Tensor, grad_state: Tensor,
                       grad_momentum: Tensor, chunk_size: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, u, alpha, beta, grad_o, grad_state, grad_momentum = _contiguous(
        q, k, u, alpha, beta, grad_o, grad_state, grad_momentum)
    return tuple(momentum_backward(q, k, u, alpha, beta, h_chunks, z_chunks, grad_o, grad_state,
                                   grad_momentum, *_tiles(q.shape[-1], u.shape[-1], chunk_size)))


@_momentum_rule_bwd.register_fake
def _(q, k, u, alpha, beta, h_chunks, z_chunks, grad_o, grad_state, grad_momentum, chunk_size):
    # row-major like the op's (contiguous-input) outputs, whatever the inputs' strides
    return (*(t.new_empty(t.shape) for t in (q, k, u, alpha, beta)),
            *(g.new_empty(g.shape, dtype=torch.float32) for g in (grad_state, grad_momentum)))


def _momentum_setup_context(ctx, inputs, output):
    q, k, u, alpha, beta, initial_state, initial_momentum, chunk_size, save = inputs
    ctx.save_for_backward(q, k, u, alpha, beta, output[3], output[4])
    ctx.chunk_size = chunk_size
    ctx.state_dtypes = [None if s is None else s.dtype for s in (initial_state, initial_momentum)]
    ctx.mark_non_differentiable(output[3], output[4])


def _momentum_rule_backward(ctx, grad_o, grad_state, grad_momentum, _grad_h, _grad_z):
    q, k, u, alpha, beta, h_chunks, z_chunks = ctx.saved_tensors
    check_saved_chunks(h_chunks, "momentum_rule_triton")
    B, T, H, K = q.shape
    V = u.shape[-1]
    grad_o = _grad_or_zeros(grad_o, (B, T, H, V), q, q.dtype)
    grad_state = _grad_or_zeros(grad_state, (B, H, V, K), q, torch.float32)
    grad_momentum = _grad_or_zeros(grad_momentum, (B, H, V, K), q, torch.float32)
    dq, dk, du, dalpha, dbeta, ds0, dz0 = torch.ops.nested_learning.momentum_rule_bwd(
        q, k, u, alpha, beta, h_chunks, z_chunks, grad_o, grad_state, grad_momentum,
        ctx.chunk_size)
    ds0, dz0 = [None if dtype is None else g.to(dtype)
                for g, dtype in zip((ds0, dz0), ctx.state_dtypes)]
    return dq, dk, du, dalpha, dbeta, ds0, dz0, None, None


_momentum_rule_fwd.register_autograd(_momentum_rule_backward,
                                     setup_context=_momentum_setup_context)


def momentum_rule_triton(q, k, u, alpha, beta, initial_state=None, initial_momentum=None,
                         chunk_size=64):
    """Z_t = beta_t Z_{t-1} + u_t k_t^T ;  S_t = alpha_t S_{t-1} + Z_t ;  o_t = S_t q_t
    (Titans Eq. 13-14). Returns (o [B,T,H,V] in q's dtype, S_T, Z_T [B,H,V,K] fp32)."""
    check_scan_inputs(q, k, u, {"alpha": alpha, "beta": beta},
                      {"initial_state": initial_state, "initial_momentum": initial_momentum},
                      chunk_size, kernels=KERNELS)
    save = _needs_grad(q, k, u, alpha, beta, initial_state, initial_momentum)
    o, s_final, z_final, _, _ = torch.ops.nested_learning.momentum_rule_fwd(
        q, k, u, alpha, beta, initial_state, initial_momentum, chunk_size, save)
    return o, s_final, z_final
