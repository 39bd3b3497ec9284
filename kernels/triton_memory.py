"""Fused Triton kernels for a whole linear memory layer (DESIGN §3.3, §4 item (a)).

A memory layer is a chunk loop: at the start of every chunk of C tokens the inner gradient
is taken at the chunk-start weights W_B, the per-token transition runs over the chunk and
the readout follows each write (memory.py's module docstring has the math). For a linear
memory M(x) = W x the write of token t is, with h = W_B^T [K, V] (the kernels' transposed
state) and the write rate lw_t (lr_t, or eta'_t for DGD):

    u_t = -lw_t dl_t/d(W k_t) = -2 lw_t (W_B k_t - v_t)      U = 2 diag(lw) (V - K h)

It is linear in the chunk-start state, so a memory layer is one of the two scans with the
scan's chunk = the memory's chunk and the write folded into the chunk algebra:

* DGD / GD (NL Eq. 57/88), the delta rule of triton_delta.py: Delta = Tm U - Tm diag(eta e^gp) K h
  becomes Delta = U~' - W~ h with
      W~  = Tm diag(eta e^gp + 2 lw) K         U~' = Tm diag(2 lw) V
  (GD is eta = 0, Tm = I). Only the prep changes; the chunk scans are the delta rule's.
* momentum (Titans Eq. 13-14), triton_momentum.py's scans with U formed inside the scan
  from the chunk-start h (V-local), and in the backward dh += -2 K^T diag(lw) dU.
The kernels below run those files' chunk-loop bodies in their MEMORY variant: one body per
loop serves the scan primitive and the memory layer.

So the whole layer -- inner forward at W_B, closed-form inner gradient, transitions,
readout after the write -- is one forward scan per (V-block, batch*head) over all chunks.
The forward keeps only the chunk-start states (T/C of them); the backward recomputes W~,
U~', Delta and U from them chunk by chunk.

    fused_linear_memory_delta(q, k, v, alpha, eta, lr_write, initial_state, chunk_size)
        -> (y [B,T,H,d], W_T [B,H,d,d] fp32, W_B of the last chunk [B,H,d,d] fp32)
    fused_linear_memory_momentum(q, k, v, alpha, beta, lr, initial_state, initial_momentum,
                                 chunk_size) -> (y, W_T, Z_T, W_B of the last chunk)

Gradients flow to every input (queries, keys, targets, gates, initial weights and momenta)
and from every output. chunk_size C <= 64, or <= 32 when d > 64 (max_chunk; a chunk is one
[BT, BT] tile, BT = max(16, next_pow2(C)); the rows past C are no-op padding); head dim
<= 128. Outputs: y in q's dtype, states fp32. The 2-layer MLP memory is fused in
triton_mlp_memory.py, the CMS fast levels in triton_cms.py.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import MAX_KEY_DIM, check_saved_chunks, check_scan_inputs
from .triton_delta import (CHUNK_WARPS, _contiguous, _delta_bwd_grads, _delta_bwd_scan,
                           _delta_fwd_scan, _delta_prep, _grad_or_zeros, _launch_dims, _needs_grad,
                           autotune_scan, jit_any_length, launch_scan, on_input_device)
from .triton_momentum import _momentum_bwd_grads, _momentum_bwd_scan, _momentum_fwd_scan

__all__ = ["fused_linear_memory_delta", "fused_linear_memory_momentum", "MAX_CHUNK",
           "MAX_HEAD_DIM", "fusable", "max_chunk"]

MAX_CHUNK = 64           # one memory chunk = one tile of rows
MAX_HEAD_DIM = MAX_KEY_DIM   # the whole key dimension of the state sits in one register tile


# ----------------------------------------------------------------------------- DGD / GD
# The kernels are the delta rule's chunk loops (triton_delta.py) in their MEMORY variant.

@jit_any_length
def _mem_delta_prep_kernel(k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, w_ptr, u2_ptr,
                           T, H, K, V, C, WITH_U2: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One memory chunk: W~ = Tm diag(eta e^gp + 2 lw) K and (WITH_U2) U~' = Tm diag(2 lw) V."""
    _delta_prep(k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, w_ptr, u2_ptr, T, H, K, V, C,
                WITH_U2, True, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _mem_delta_fwd_kernel(q_ptr, k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, o_ptr, hc_ptr,
                          sT_ptr, sB_ptr, T, H, K, V, C, NT, NBH, SAVE: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          PREC: tl.constexpr):
    """The chunk loop, one program per (V-block, batch*head), h [BK, BV] in registers:
    Delta = U~' - W~ h (write at W_B + DGD transition), readout O, next chunk-start h."""
    _delta_fwd_scan(q_ptr, k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, o_ptr, hc_ptr, hc_ptr,
                    sT_ptr, sB_ptr, T, H, K, V, C, NT, True, SAVE, True, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _mem_delta_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dsB_ptr,
                               dhc_ptr, dd_ptr, ds0_ptr, T, H, K, V, C, NT, NBH, BT: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying dh = dL/dh_next: the delta rule's backward scan with W~
    (so dh also collects the writes' dependence on W_B), plus the gradient of the returned
    last chunk-start state, added once the last chunk has been stepped back."""
    _delta_bwd_scan(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dsB_ptr, dhc_ptr, dd_ptr,
                    ds0_ptr, T, H, K, V, C, NT, True, BT, BK, BV, PREC)


@jit_any_length
def _mem_delta_bwd_grads_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, do_ptr,
                                dd_ptr, hc_ptr, dhc_ptr, dq_ptr, dk_ptr, dv_ptr, dalpha_ptr,
                                deta_ptr, dlw_ptr, T, H, K, V, C, NT, BT: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Everything that sums over V, for one chunk, recomputing W~, U~' and Delta from the
    saved chunk-start h: the delta rule's chain rule with B~ = diag(eta e^gp + 2 lw) K in
    place of B and U~ = diag(2 lw) V in place of the writes."""
    _delta_bwd_grads(q_ptr, k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, do_ptr, dd_ptr, dd_ptr,
                     hc_ptr, dhc_ptr, dq_ptr, dk_ptr, dv_ptr, dalpha_ptr, deta_ptr, dlw_ptr,
                     T, H, K, V, C, NT, True, BT, BK, BV, PREC)


# ----------------------------------------------------------------------------- momentum
# The kernels are the momentum rule's chunk loops (triton_momentum.py) in their MEMORY variant.

@autotune_scan
@jit_any_length
def _mem_momentum_fwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, s0_ptr, z0_ptr,
                             o_ptr, hc_ptr, zc_ptr, sT_ptr, zT_ptr, sB_ptr, T, H, K, V, C, NT, NBH,
                             SAVE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, PREC: tl.constexpr):
    """The chunk loop with Titans' momentum: U = 2 diag(lw) (V - K h) at the chunk-start h
    (V-local), then triton_momentum.py's closed form over the chunk."""
    _momentum_fwd_scan(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, s0_ptr, z0_ptr, o_ptr,
                       hc_ptr, zc_ptr, sT_ptr, zT_ptr, sB_ptr, T, H, K, V, C, NT, True, True,
                       SAVE, True, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _mem_momentum_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, dsT_ptr,
                                  dzT_ptr, dsB_ptr, dhc_ptr, dzc_ptr, du_ptr, dv_ptr, ds0_ptr,
                                  dz0_ptr, T, H, K, V, C, NT, NBH, BT: tl.constexpr,
                                  BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying (dh, dz). Per chunk, the momentum rule's step back, then
    the writes' dependence on the chunk-start state: dh += -2 K^T diag(lw) dU; dV = 2 lw dU.
    dU (fp32, [B, T, H, V]) is kept for the gradient kernel."""
    _momentum_bwd_scan(q_ptr, k_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, dsT_ptr, dzT_ptr,
                       dsB_ptr, dhc_ptr, dzc_ptr, du_ptr, dv_ptr, ds0_ptr, dz0_ptr, T, H, K, V,
                       C, NT, True, BT, BK, BV, PREC)


@jit_any_length
def _mem_momentum_bwd_grads_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr,
                                   du_ptr, hc_ptr, zc_ptr, dhc_ptr, dzc_ptr, dq_ptr, dk_ptr,
                                   dalpha_ptr, dbeta_ptr, dlw_ptr, T, H, K, V, C, NT,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                   PREC: tl.constexpr):
    """dq, dk and the gate gradients of one chunk (sums over V), U recomputed from the saved
    chunk-start h: the momentum rule's chain rule plus U = 2 diag(lw) (V - K h)."""
    _momentum_bwd_grads(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, du_ptr,
                        hc_ptr, zc_ptr, dhc_ptr, dzc_ptr, dq_ptr, dk_ptr, dalpha_ptr, dbeta_ptr,
                        dlw_ptr, T, H, K, V, C, NT, True, BT, BK, BV, PREC)


# ----------------------------------------------------------------------------- host side

def _tiles(d, chunk_size):
    """(BT, BK, BV): one memory chunk per BT rows (tl.dot needs >= 16), V in blocks of <= 64."""
    return (max(16, triton.next_power_of_2(chunk_size)), max(16, triton.next_power_of_2(d)),
            min(64, max(16, triton.next_power_of_2(d))))


def max_chunk(d):
    """Largest chunk C the fused kernels take at head dim d: 64, or 32 when d > 64, the rule of
    the scans at K > 64 (triton_scans.WIDE_KEY_CHUNK, where its reasons are measured)."""
    return MAX_CHUNK if d <= 64 else MAX_CHUNK // 2


def fusable(d, chunk_size):
    """Whether the fused kernels cover a linear memory of head dim d with chunk C."""
    return d <= MAX_HEAD_DIM and 1 <= chunk_size <= max_chunk(d)


def _check_inputs(tensors, states, chunk_size, caller):
    """One-line ValueErrors naming what is wrong (kernels/checks.py, the check every scan
    path shares, then T >= 1). tensors: q, k, v [B,T,H,d] then gates [B,T,H] (by name);
    states [B,H,d,d]."""
    gates = {n: t for n, t in tensors.items() if n not in ("q", "k", "v")}
    check_scan_inputs(tensors["q"], tensors["k"], tensors["v"], gates, states, chunk_size,
                      u_name="v", dims=("d", "d"), kernels="the fused memory kernels",
                      max_chunk=max_chunk, states_optional=False)
    if tensors["q"].shape[1] == 0:
        raise ValueError(f"{caller} needs T >= 1 tokens")


def _launch_args(q, chunk_size):
    """(B, T, H, d, NT, the tile constexprs, kwargs of an fp32 buffer on q's device)."""
    B, T, H, d, _, NT, tiles, f32 = _launch_dims(q, q, chunk_size,
                                                 *_tiles(q.shape[-1], chunk_size))
    return B, T, H, d, NT, tiles, f32


# DGD / GD -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_linear_delta_fwd", mutates_args=())
@on_input_device
def _memory_delta_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor,
                      lr_write: Tensor, initial_state: Tensor, chunk_size: int,
                      save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, eta, lr_write, s0 = _contiguous(q, k, v, alpha, eta, lr_write, initial_state)
    B, T, H, d, NT, tiles, f32 = _launch_args(q, chunk_size)
    w = torch.empty(B * H, T, d, **f32)
    u2 = torch.empty(B * H, T, d, **f32)
    o = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    h_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    s_final, s_start = torch.empty(B, H, d, d, **f32), torch.empty(B, H, d, d, **f32)
    _mem_delta_prep_kernel[(NT, B * H)](k, v, alpha, eta, lr_write, w, u2, T, H, d, d,
                                        chunk_size, WITH_U2=True, **tiles,
                                        num_warps=CHUNK_WARPS, num_stages=1)
    launch_scan(_mem_delta_fwd_kernel, d, B * H,
                q, k, alpha, w, u2, s0, o, h_chunks, s_final, s_start, T, H, d, d, chunk_size, NT,
                SAVE=save, **tiles)
    return o, s_final, s_start, h_chunks


@_memory_delta_fwd.register_fake
def _(q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save):
    B, T, H, d = q.shape
    NT = (T + chunk_size - 1) // chunk_size
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, T, H, d), q.new_empty(B, H, d, d, **f32),
            q.new_empty(B, H, d, d, **f32), q.new_empty((B * H, NT, d, d) if save else (0,), **f32))


@torch.library.custom_op("nested_learning::memory_linear_delta_bwd", mutates_args=())
@on_input_device
def _memory_delta_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor,
                      lr_write: Tensor, h_chunks: Tensor, grad_o: Tensor, grad_state: Tensor,
                      grad_start: Tensor, chunk_size: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, eta, lr_write, grad_o, grad_state, grad_start = _contiguous(
        q, k, v, alpha, eta, lr_write, grad_o, grad_state, grad_start)
    B, T, H, d, NT, tiles, f32 = _launch_args(q, chunk_size)
    w = torch.empty(B * H, T, d, **f32)
    dh_chunks = torch.empty(B * H, NT, d, d, **f32)
    dd = torch.empty(B * H, T, d, **f32)
    ds0 = torch.empty(B, H, d, d, **f32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, deta, dlw = torch.empty_like(alpha), torch.empty_like(eta), torch.empty_like(lr_write)
    _mem_delta_prep_kernel[(NT, B * H)](k, v, alpha, eta, lr_write, w, w, T, H, d, d,
                                        chunk_size, WITH_U2=False, **tiles,
                                        num_warps=CHUNK_WARPS, num_stages=1)
    launch_scan(_mem_delta_bwd_scan_kernel, d, B * H,
                q, k, alpha, w, grad_o, grad_state, grad_start, dh_chunks, dd, ds0, T, H, d, d,
                chunk_size, NT, **tiles)
    _mem_delta_bwd_grads_kernel[(NT, B * H)](
        q, k, v, alpha, eta, lr_write, grad_o, dd, h_chunks, dh_chunks, dq, dk, dv, dalpha,
        deta, dlw, T, H, d, d, chunk_size, NT, **tiles, num_warps=CHUNK_WARPS, num_stages=1)
    return dq, dk, dv, dalpha, deta, dlw, ds0


@_memory_delta_bwd.register_fake
def _(q, k, v, alpha, eta, lr_write, h_chunks, grad_o, grad_state, grad_start, chunk_size):
    # the op makes its inputs contiguous first: new row-major buffers, not empty_like (which
    # keeps a permuted input's strides)
    return (*(t.new_empty(t.shape) for t in (q, k, v, alpha, eta, lr_write)),
            grad_state.new_empty(grad_state.shape, dtype=torch.float32))


def _memory_delta_setup_context(ctx, inputs, output):
    q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, lr_write, output[3])
    ctx.chunk_size, ctx.state_dtype = chunk_size, initial_state.dtype
    ctx.mark_non_differentiable(output[3])


def _memory_delta_backward(ctx, grad_o, grad_state, grad_start, _grad_h_chunks):
    q, k, v, alpha, eta, lr_write, h_chunks = ctx.saved_tensors
    check_saved_chunks(h_chunks, "fused_linear_memory_delta")
    B, T, H, d = q.shape
    grad_o = _grad_or_zeros(grad_o, (B, T, H, d), q, q.dtype)
    grad_state = _grad_or_zeros(grad_state, (B, H, d, d), q)
    grad_start = _grad_or_zeros(grad_start, (B, H, d, d), q)
    dq, dk, dv, dalpha, deta, dlw, ds0 = torch.ops.nested_learning.memory_linear_delta_bwd(
        q, k, v, alpha, eta, lr_write, h_chunks, grad_o, grad_state, grad_start, ctx.chunk_size)
    return dq, dk, dv, dalpha, deta, dlw, ds0.to(ctx.state_dtype), None, None


_memory_delta_fwd.register_autograd(_memory_delta_backward,
                                    setup_context=_memory_delta_setup_context)


def fused_linear_memory_delta(q, k, v, alpha, eta, lr_write, initial_state, chunk_size):
    """A linear memory layer with the DGD (or GD) transition, fused (module docstring):
        W_t = W_{t-1} (alpha_t I - eta_t k_t k_t^T) - 2 lr_write_t (W_B k_t - v_t) k_t^T
        y_t = W_t q_t                    (W_B: the weights at the start of t's chunk)
    DGD (NL Eq. 57/88): eta = lr_write = eta'; GD: eta = 0, lr_write = lr. Chunks start at
    t = 0, every chunk_size tokens. Returns (y [B,T,H,d] in q's dtype, W_T fp32, W_B of the
    last chunk fp32); W_B [B,H,d,d] is (out, in) like memory.py's weights."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "eta": eta, "lr_write": lr_write},
                  {"initial_state": initial_state}, chunk_size, "fused_linear_memory_delta")
    save = _needs_grad(q, k, v, alpha, eta, lr_write, initial_state)
    o, s_final, s_start, _ = torch.ops.nested_learning.memory_linear_delta_fwd(
        q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save)
    return o, s_final, s_start


# momentum -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_linear_momentum_fwd", mutates_args=())
@on_input_device
def _memory_momentum_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                         lr: Tensor, initial_state: Tensor, initial_momentum: Tensor,
                         chunk_size: int, save: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, beta, lr, s0, z0 = _contiguous(q, k, v, alpha, beta, lr, initial_state,
                                                   initial_momentum)
    B, T, H, d, NT, tiles, f32 = _launch_args(q, chunk_size)
    o = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    h_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    z_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    s_final, z_final, s_start = (torch.empty(B, H, d, d, **f32) for _ in range(3))
    launch_scan(_mem_momentum_fwd_kernel, d, B * H,
                q, k, v, alpha, beta, lr, s0, z0, o, h_chunks, z_chunks, s_final, z_final,
                s_start, T, H, d, d, chunk_size, NT, SAVE=save, **tiles)
    return o, s_final, z_final, s_start, h_chunks, z_chunks


@_memory_momentum_fwd.register_fake
def _(q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save):
    B, T, H, d = q.shape
    NT = (T + chunk_size - 1) // chunk_size
    f32 = dict(dtype=torch.float32)
    chunks = (B * H, NT, d, d) if save else (0,)
    return (q.new_empty(B, T, H, d), q.new_empty(B, H, d, d, **f32),
            q.new_empty(B, H, d, d, **f32), q.new_empty(B, H, d, d, **f32),
            q.new_empty(chunks, **f32), q.new_empty(chunks, **f32))


@torch.library.custom_op("nested_learning::memory_linear_momentum_bwd", mutates_args=())
@on_input_device
def _memory_momentum_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                         lr: Tensor, h_chunks: Tensor, z_chunks: Tensor, grad_o: Tensor,
                         grad_state: Tensor, grad_momentum: Tensor, grad_start: Tensor,
                         chunk_size: int
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start = _contiguous(
        q, k, v, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start)
    B, T, H, d, NT, tiles, f32 = _launch_args(q, chunk_size)
    dh_chunks = torch.empty(B * H, NT, d, d, **f32)
    dz_chunks = torch.empty(B * H, NT, d, d, **f32)
    du = torch.empty(B, T, H, d, **f32)
    ds0, dz0 = torch.empty(B, H, d, d, **f32), torch.empty(B, H, d, d, **f32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, dbeta, dlr = torch.empty_like(alpha), torch.empty_like(beta), torch.empty_like(lr)
    launch_scan(_mem_momentum_bwd_scan_kernel, d, B * H,
                q, k, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start, dh_chunks,
                dz_chunks, du, dv, ds0, dz0, T, H, d, d, chunk_size, NT, **tiles)
    _mem_momentum_bwd_grads_kernel[(NT, B * H)](
        q, k, v, alpha, beta, lr, grad_o, du, h_chunks, z_chunks, dh_chunks, dz_chunks, dq, dk,
        dalpha, dbeta, dlr, T, H, d, d, chunk_size, NT, **tiles, num_warps=CHUNK_WARPS,
        num_stages=1)
    return dq, dk, dv, dalpha, dbeta, dlr, ds0, dz0


@_memory_momentum_bwd.register_fake
def _(q, k, v, alpha, beta, lr, h_chunks, z_chunks, grad_o, grad_state, grad_momentum,
      grad_start, chunk_size):
    # row-major like the op's (contiguous-input) outputs, whatever the inputs' strides
    return (*(t.new_empty(t.shape) for t in (q, k, v, alpha, beta, lr)),
            *(g.new_empty(g.shape, dtype=torch.float32) for g in (grad_state, grad_momentum)))


def _memory_momentum_setup_context(ctx, inputs, output):
    q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save = inputs
    ctx.save_for_backward(q, k, v, alpha, beta, lr, output[4], output[5])
    ctx.chunk_size = chunk_size
    ctx.state_dtypes = (initial_state.dtype, initial_momentum.dtype)
    ctx.mark_non_differentiable(output[4], output[5])


def _memory_momentum_backward(ctx, grad_o, grad_state, grad_momentum, grad_start, _gh, _gz):
    q, k, v, alpha, beta, lr, h_chunks, z_chunks = ctx.saved_tensors
    check_saved_chunks(h_chunks, "fused_linear_memory_momentum")
    B, T, H, d = q.shape
    grad_o = _grad_or_zeros(grad_o, (B, T, H, d), q, q.dtype)
    grad_state, grad_momentum, grad_start = (_grad_or_zeros(g, (B, H, d, d), q)
                                             for g in (grad_state, grad_momentum, grad_start))
    dq, dk, dv, dalpha, dbeta, dlr, ds0, dz0 = torch.ops.nested_learning.memory_linear_momentum_bwd(
        q, k, v, alpha, beta, lr, h_chunks, z_chunks, grad_o, grad_state, grad_momentum,
        grad_start, ctx.chunk_size)
    return (dq, dk, dv, dalpha, dbeta, dlr, ds0.to(ctx.state_dtypes[0]),
            dz0.to(ctx.state_dtypes[1]), None, None)


_memory_momentum_fwd.register_autograd(_memory_momentum_backward,
                                       setup_context=_memory_momentum_setup_context)


def fused_linear_memory_momentum(q, k, v, alpha, beta, lr, initial_state, initial_momentum,
                                 chunk_size):
    """A linear memory layer with Titans' momentum transition (Eq. 13-14), fused:
        Z_t = beta_t Z_{t-1} - 2 lr_t (W_B k_t - v_t) k_t^T ;  W_t = alpha_t W_{t-1} + Z_t
        y_t = W_t q_t
    Returns (y [B,T,H,d] in q's dtype, W_T, Z_T, W_B of the last chunk; states fp32)."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "beta": beta, "lr": lr},
                  {"initial_state": initial_state, "initial_momentum": initial_momentum},
                  chunk_size, "fused_linear_memory_momentum")
    save = _needs_grad(q, k, v, alpha, beta, lr, initial_state, initial_momentum)
    o, s_final, z_final, s_start, _, _ = torch.ops.nested_learning.memory_linear_momentum_fwd(
        q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save)
    return o, s_final, z_final, s_start
