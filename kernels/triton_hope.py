"""Fused Triton kernel for HOPE's stage 1, inference only: all projection memories of a layer
over a whole segment in one launch (hope.py's module docstring; NL Eq. 84-90; DESIGN §3.5).

Stage 1 reads k, v, eta, alpha at each C_other chunk's start weights before that chunk's
writes, so the per-chunk path walks a segment piece by piece: ~40 PyTorch ops and one kernel
launch per chunk per layer (BENCHMARKS.md: at hope_760m that is launch-bound). Here one
program per (batch, head) holds the four projection memories M_k, M_v, M_eta, M_alpha (the
stacked NeuralMemory of hope.py: head m*H + h is memory m's head h) and, per chunk of C:

  1. reads at the chunk-start weights (NL Eq. 90), R_m = X + s(X h1_m) h2_m for the features
     X = x~ of the chunk (triton_mlp_memory's row form: h1 = W_in^T, h2 = W_out^T):
        k = R_k / max(||R_k||, 1e-12)      v = R_v
        eta = eta_max sigmoid(R_eta . w_eta + b_eta)      alpha = sigmoid(R_alpha . w_alpha + b_alpha)
  2. each memory's chunk step with its own target M_m,B(v) (NL Eq. 87) and the shared keys and
     gates: triton_mlp_memory's DGD / GD chunk (`_self_target`, `_inner_write`, one
     `_chunk_delta_fwd` per layer). The projection memories' readouts are not used.

The running states live in the output buffers (re-read behind a barrier for every use, as
triton_mlp_memory's scratch round-trips: no state tile stays live across the chunk). Outputs:
k, v [B,T,H,d], eta, alpha [B,T,H] (stage 2's inputs), the stacked weights after the last
token and at the last chunk's start. No backward: training keeps the per-chunk path (a fused
backward couples the memories through k and v and is not built yet), so `fused_hope_projections`
refuses inputs that need gradients. Covered: the default projection set (k, v, eta, alpha),
DGD or GD, the shapes `triton_mlp_memory.fusable_mlp` takes for DGD.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import SUPPORTED_DTYPES, check_tensors
from .triton_cms import ACT_IDS, _act
from .triton_delta import (CHUNK_WARPS, _chunk_span, _contiguous, _delta_chunk_gates,
                           _load_rows, _load_state, _program, _store_gate, _store_rows,
                           _store_state, dot_precision)
from .triton_mlp_memory import _chunk_delta_fwd, _inner_write, _self_target, _tiles, fusable_mlp

__all__ = ["fused_hope_projections", "PROJECTIONS"]

PROJECTIONS = ("k", "v", "eta", "alpha")       # hope.py's stacking order for the default layer
N_MEMORIES = tl.constexpr(4)


@triton.jit
def _state_reload(ptr, base, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A running state tile, re-read behind a barrier (every thread's last store is visible,
    and the compiler keeps no copy live from an earlier read)."""
    tl.debug_barrier()
    return _load_state(ptr, base, K, V, 0, BK, BV)


@triton.jit
def _memory_read(x, win_ptr, wout_ptr, base, D, E, ACT: tl.constexpr, BD: tl.constexpr,
                 BE: tl.constexpr, PREC: tl.constexpr):
    """M(X) = X + s(X h1) h2 at the running (= chunk-start) weights of one memory."""
    return _self_target(x, _state_reload(win_ptr, base, D, E, BD, BE),
                        _state_reload(wout_ptr, base, E, D, BE, BD), ACT, PREC)


@triton.jit
def _gate(r, w, b):
    """sigmoid(r . w + b) per row: hope.py's `_gate` on one head."""
    return tl.sigmoid(tl.sum(r * w[None, :], 1) + b)


@triton.jit
def _hope_projections_fwd_kernel(x_ptr, win_ptr, wout_ptr, weta_ptr, beta_ptr, walpha_ptr,
                                 balpha_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, winT_ptr,
                                 woutT_ptr, winB_ptr, woutB_ptr, T, H, D, E, C, NT, eta_max,
                                 tau, DGD: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr,
                                 BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                                 PREC: tl.constexpr):
    """One (batch, head): the chunk loop of the module docstring over the four memories."""
    i_unused, bh64, g_base = _program(T, H)
    i_b, i_h = bh64 // H, bh64 % H
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    for m in tl.static_range(N_MEMORIES):            # running states start as the initial ones
        base = ((i_b * N_MEMORIES + m) * H + i_h) * E * D
        _store_state(winT_ptr, base, D, E, 0, _load_state(win_ptr, base, D, E, 0, BD, BE), BD, BE)
        _store_state(woutT_ptr, base, E, D, 0, _load_state(wout_ptr, base, E, D, 0, BE, BD), BE, BD)
    w_eta = tl.load(weta_ptr + i_h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    w_alpha = tl.load(walpha_ptr + i_h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    b_eta = tl.load(beta_ptr + i_h).to(tl.float32)
    b_alpha = tl.load(balpha_ptr + i_h).to(tl.float32)
    base0 = (i_b * N_MEMORIES * H + i_h) * E * D     # memory m at base0 + m * H * E * D
    step = H * E * D
    for i_t in range(NT):
        t0, end, L = _chunk_span(i_t, C, T)
        x = _load_rows(x_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        # 1. reads at the chunk start (padding rows of x are 0, so are their reads of k, v)
        r = _memory_read(x, winT_ptr, woutT_ptr, base0, D, E, ACT, BD, BE, PREC)
        k = r / tl.maximum(tl.sqrt(tl.sum(r * r, 1)), 1e-12)[:, None]
        v = _memory_read(x, winT_ptr, woutT_ptr, base0 + step, D, E, ACT, BD, BE, PREC)
        r = _memory_read(x, winT_ptr, woutT_ptr, base0 + 2 * step, D, E, ACT, BD, BE, PREC)
        _store_gate(eta_ptr, g_base, t0, end, H, eta_max * _gate(r, w_eta, b_eta), BT)
        r = _memory_read(x, winT_ptr, woutT_ptr, base0 + 3 * step, D, E, ACT, BD, BE, PREC)
        _store_gate(alpha_ptr, g_base, t0, end, H, _gate(r, w_alpha, b_alpha), BT)
        _store_rows(k_ptr, g_base * D, t0, end, H * D, 0, D, k, BT, BD)
        _store_rows(v_ptr, g_base * D, t0, end, H * D, 0, D, v, BT, BD)
        tl.debug_barrier()                           # the gates back as the scans read them
        g, gp, lr, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
        # 2. every memory's write toward its own target M_m,B(v), at its chunk-start weights
        for m in tl.static_range(N_MEMORIES):
            base = base0 + m * step
            if i_t == NT - 1:                        # the returned W_B
                _store_state(winB_ptr, base, D, E, 0,
                             _state_reload(winT_ptr, base, D, E, BD, BE), BD, BE)
                _store_state(woutB_ptr, base, E, D, 0,
                             _state_reload(woutT_ptr, base, E, D, BE, BD), BE, BD)
            vt = _memory_read(v, winT_ptr, woutT_ptr, base, D, E, ACT, BD, BE, PREC)
            scale, hh, s1, s2, err, mm, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
                k, vt, lr, _state_reload(winT_ptr, base, D, E, BD, BE),
                _state_reload(woutT_ptr, base, E, D, BE, BD), tau, DGD, CLIP, ACT, PREC)
            o1, h1, kk1, dc1, tm1 = _chunk_delta_fwd(
                k, k, u1, eta1, g, gp, _state_reload(winT_ptr, base, D, E, BD, BE), rows, L,
                BT, PREC)
            o2, h2, kk2, dc2, tm2 = _chunk_delta_fwd(
                hh, hh, u2, eta2, g, gp, _state_reload(woutT_ptr, base, E, D, BE, BD), rows, L,
                BT, PREC)
            tl.debug_barrier()                       # every read of the old state is done
            _store_state(winT_ptr, base, D, E, 0, h1, BD, BE)
            _store_state(woutT_ptr, base, E, D, 0, h2, BE, BD)


@torch.library.custom_op("nested_learning::hope_projections_fwd", mutates_args=())
def _hope_projections_fwd(x: Tensor, w_in: Tensor, w_out: Tensor, eta_weight: Tensor,
                          eta_bias: Tensor, alpha_weight: Tensor, alpha_bias: Tensor,
                          eta_max: float, chunk_size: int, dgd: bool, activation: str,
                          max_grad_norm: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias = _contiguous(
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias)
    B, T, H, d = x.shape
    E = w_in.shape[2]
    BT, BD, BE = _tiles(d, E, chunk_size)
    k, v = torch.empty_like(x), torch.empty_like(x)
    eta, alpha = x.new_empty(B, T, H), x.new_empty(B, T, H)
    states = [torch.empty_like(w) for w in (w_in, w_out, w_in, w_out)]
    clip = max_grad_norm > 0
    _hope_projections_fwd_kernel[(1, B * H)](
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, *states,
        T, H, d, E, chunk_size, triton.cdiv(T, chunk_size), float(eta_max),
        float(max_grad_norm) if clip else 1.0, DGD=dgd, CLIP=clip, ACT=ACT_IDS[activation],
        BT=BT, BD=BD, BE=BE, PREC=dot_precision(x.dtype), num_warps=CHUNK_WARPS, num_stages=1)
    return (k, v, eta, alpha, *states)


@_hope_projections_fwd.register_fake
def _(x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, eta_max, chunk_size, dgd,
      activation, max_grad_norm):
    B, T, H, _ = x.shape
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(B, T, H), x.new_empty(B, T, H),
            *(w.new_empty(w.shape) for w in (w_in, w_out, w_in, w_out)))


def fused_hope_projections(x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias,
                           eta_max, chunk_size, dgd=True, activation="silu", max_grad_norm=None):
    """HOPE's stage 1 over a segment that starts at a chunk boundary (module docstring), for
    inference. x [B,T,H,d] fp32 (the features x~); w_in [B,4H,E,d], w_out [B,4H,d,E] fp32 (the
    stacked memories in PROJECTIONS order, memory-major); eta_weight, alpha_weight [H,d];
    eta_bias, alpha_bias [H]. Returns (k, v [B,T,H,d], eta, alpha [B,T,H], (W_in, W_out) after
    the last token, (W_in, W_out) at the last chunk's start)."""
    tensors = {"x": x, "w_in": w_in, "w_out": w_out, "eta_weight": eta_weight,
               "eta_bias": eta_bias, "alpha_weight": alpha_weight, "alpha_bias": alpha_bias}
    check_tensors(tensors, "x", SUPPORTED_DTYPES[:1], "fused_hope_projections")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise RuntimeError("fused_hope_projections has no backward: call it under torch.no_grad() "
                           "(training takes hope.py's per-chunk path)")
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(f"x must be [B,T,H,d] with T >= 1; got {list(x.shape)}")
    B, T, H, d = x.shape
    n = len(PROJECTIONS)
    if w_in.dim() != 4 or w_in.shape[:2] != (B, n * H) or w_in.shape[3] != d:
        raise ValueError(f"w_in must be [B,{n}H,E,d] with B,H,d = {[B, H, d]}; got {list(w_in.shape)}")
    E = w_in.shape[2]
    if tuple(w_out.shape) != (B, n * H, d, E):
        raise ValueError(f"w_out must be [B,{n}H,d,E] = {[B, n * H, d, E]}; got {list(w_out.shape)}")
    for name in ("eta_weight", "alpha_weight"):
        if tuple(tensors[name].shape) != (H, d):
            raise ValueError(f"{name} must be [H,d] = {[H, d]}; got {list(tensors[name].shape)}")
    for name in ("eta_bias", "alpha_bias"):
        if tuple(tensors[name].shape) != (H,):
            raise ValueError(f"{name} must be [H] = {[H]}; got {list(tensors[name].shape)}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
            or not fusable_mlp(d, max(1, E // d), chunk_size, "dgd") or E % d):
        raise ValueError(f"head dim {d}, hidden {E}, chunk_size {chunk_size!r}: not a shape the "
                         f"fused MLP memory kernels take (triton_mlp_memory.fusable_mlp)")
    if activation not in ACT_IDS:
        raise ValueError(f"activation must be one of {', '.join(ACT_IDS)}; got {activation!r}")
    if max_grad_norm is not None and not 0 < max_grad_norm < float("inf"):
        raise ValueError(f"max_grad_norm must be None or a finite number > 0; got {max_grad_norm!r}")
    k, v, eta, alpha, win_T, wout_T, win_B, wout_B = torch.ops.nested_learning.hope_projections_fwd(
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, float(eta_max), chunk_size,
        bool(dgd), activation, 0.0 if max_grad_norm is None else float(max_grad_norm))
    return k, v, eta, alpha, (win_T, wout_T), (win_B, wout_B)
