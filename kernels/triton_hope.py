"""Fused Triton kernels for HOPE's stage 1: all projection memories of a layer over a whole
segment in one launch, forward and backward (hope.py's module docstring; NL Eq. 84-90;
DESIGN §3.5).

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
     `_chunk_delta_fwd` per layer). The projection memories' readouts are not used, so the
     chunk steps skip them (READOUT=False: no readout dots forward, no dO chain backward).

The forward's running states live in its output buffers (re-read behind a barrier for every
use, as triton_mlp_memory's scratch round-trips: no state tile stays live across the chunk);
with gradients it saves every R-th chunk's start states (R = `save_interval`: every chunk up
to 16 chunks, else ceil(sqrt(NT))). The backward walks the chunks in reverse
carrying dL/d(state) of each memory in its output buffers (for R > 1, block by block of R
chunks, last first: each block's forward is re-run from its saved start to get its chunk
starts, and the state gradients carry over from block to block); per chunk:

  a. each memory's chunk step backward from its saved start (triton_mlp_memory's
     `_dgd_chunk_bwd` without the readout chain), summing the memories' dk, dv, deta (their lr)
     and dalpha onto the gradients the outputs k, v, eta, alpha received (stage 2's);
  b. the reads backward: dR_k = (dk - k (k . dk)) / ||R_k|| (dk / 1e-12 below the floor),
     dR_v = dv, dR_eta = (deta eta (1 - eta / eta_max)) w_eta, dR_alpha = (dalpha alpha
     (1 - alpha)) w_alpha (and the gate weights' and biases' gradients, per (batch, head));
     then per memory `_self_target_bwd` (the same M(X) form) gives dX and adds to dh1_m, dh2_m.

Outputs: k, v [B,T,H,d], eta, alpha [B,T,H] (stage 2's inputs), the stacked weights after the
last token and at the last chunk's start. Covered: the default projection set (k, v, eta,
alpha), DGD or GD, the shapes `fusable_projections` takes; fp32 inputs.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import SUPPORTED_DTYPES, check_constant, check_saved_chunks, check_tensors
from .triton_cms import ACT_IDS
from .triton_delta import (CHUNK_WARPS, _chunk_span, _contiguous, _delta_chunk_gates, _gate_grad,
                           _grad_or_zeros, _load_gate, _load_kv, _load_rows, _load_state,
                           _needs_grad, _program, _store_gate, _store_rows, _store_state,
                           dot_precision, jit_any_length, on_input_device)
from .triton_mlp_memory import (DELTA_SLOTS, _chunk_delta_fwd, _dgd_chunk_bwd, _inner_write,
                                _save_chunk_start, _scratch, _self_target, _self_target_bwd,
                                _spill, _state_buffers, _tiles, backward_in_blocks, check_options,
                                fusable_mlp, resolve_state_every, saved_weights)

__all__ = ["fused_hope_projections", "fusable_projections", "PROJECTIONS"]

PROJECTIONS = ("k", "v", "eta", "alpha")       # hope.py's stacking order for the default layer
N_MEMORIES = tl.constexpr(4)
# Backward scratch per program: _dgd_chunk_bwd's slots, then X and one memory's (h1, h2).
BWD_SLOTS = DELTA_SLOTS + 3


def fusable_projections(head_dim, expansion, chunk_size):
    """Whether the fused stage 1 covers projection memories of this shape (DGD or GD):
    `fusable_mlp`'s, with C <= 16 above d = 64. Shared memory of the compiled sm_90 kernels,
    all flags on (tests/test_triton_compile.py; exact / tf32 products on fp32 inputs; of
    232,448 B): hope_760m's d = E = 64, C = 16: forward 49,152 / 49,152, backward 57,344 /
    61,440; d = 64, E = 128, C = 64: forward 131,072 / 131,072, backward 147,456 / 163,840;
    d = E = 128, C = 16: forward 163,840 / 163,840, backward 212,992 / 221,184 (at C = 32 the
    tf32 backward needs 245,760)."""
    return (fusable_mlp(head_dim, expansion, chunk_size, "dgd")
            and (head_dim <= 64 or chunk_size <= 16))


@triton.jit
def _state_reload(ptr, base, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A running state tile, re-read behind a barrier (every thread's last store is visible,
    and the compiler keeps no copy live from an earlier read)."""
    tl.debug_barrier()
    return _load_state(ptr, base, K, V, 0, BK, BV)


@triton.jit
def _copy_states(src_in_ptr, src_out_ptr, dst_in_ptr, dst_out_ptr, base0, step, D, E,
                 BD: tl.constexpr, BE: tl.constexpr):
    """Every memory's (W_in, W_out)-shaped pair of this program from src to dst: where the
    forward's running states and the backward's carried state gradients start."""
    for m in tl.static_range(N_MEMORIES):
        base = base0 + m * step
        _store_state(dst_in_ptr, base, D, E, 0, _load_state(src_in_ptr, base, D, E, 0, BD, BE), BD, BE)
        _store_state(dst_out_ptr, base, E, D, 0, _load_state(src_out_ptr, base, E, D, 0, BE, BD), BE, BD)


@triton.jit
def _gate_params(w_eta_ptr, b_eta_ptr, w_alpha_ptr, b_alpha_ptr, i_h, cols, D):
    """Head i_h's gate parameters: (w_eta [BD], b_eta, w_alpha [BD], b_alpha), fp32."""
    w_eta = tl.load(w_eta_ptr + i_h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    w_alpha = tl.load(w_alpha_ptr + i_h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    return (w_eta, tl.load(b_eta_ptr + i_h).to(tl.float32), w_alpha,
            tl.load(b_alpha_ptr + i_h).to(tl.float32))


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


@jit_any_length
def _hope_projections_fwd_kernel(x_ptr, win_ptr, wout_ptr, w_eta_ptr, b_eta_ptr, w_alpha_ptr,
                                 b_alpha_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, winT_ptr,
                                 woutT_ptr, winB_ptr, woutB_ptr, h1c_ptr, h2c_ptr, T, H, D, E,
                                 C, NT, EVERY, eta_max, tau, DGD: tl.constexpr, CLIP: tl.constexpr,
                                 ACT: tl.constexpr, SAVE: tl.constexpr, BT: tl.constexpr,
                                 BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """One (batch, head): the chunk loop of the module docstring over the four memories
    (SAVE: every EVERY-th chunk's start states, [B*4H, cdiv(NT, EVERY), .], for the
    backward)."""
    i_unused, bh64, g_base = _program(T, H)
    i_b, i_h = bh64 // H, bh64 % H
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    base0 = (i_b * N_MEMORIES * H + i_h) * E * D     # memory m at base0 + m * H * E * D
    step = H * E * D
    _copy_states(win_ptr, wout_ptr, winT_ptr, woutT_ptr, base0, step, D, E, BD, BE)   # running
    w_eta, b_eta, w_alpha, b_alpha = _gate_params(w_eta_ptr, b_eta_ptr, w_alpha_ptr,
                                                  b_alpha_ptr, i_h, cols, D)
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
        for i_m in range(N_MEMORIES):                # a runtime loop: one copy of the step's code
            base = base0 + i_m * step
            _save_chunk_start(h1c_ptr, h2c_ptr, winB_ptr, woutB_ptr,
                              _state_reload(winT_ptr, base, D, E, BD, BE),
                              _state_reload(woutT_ptr, base, E, D, BE, BD),
                              (i_b * N_MEMORIES + i_m) * H + i_h, i_t, NT, EVERY, D, E, SAVE, BD,
                              BE)
            vt = _memory_read(v, winT_ptr, woutT_ptr, base, D, E, ACT, BD, BE, PREC)
            scale, hh, s1, s2, err, m_err, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
                k, vt, lr, _state_reload(winT_ptr, base, D, E, BD, BE),
                _state_reload(woutT_ptr, base, E, D, BE, BD), tau, DGD, CLIP, ACT, PREC)
            o1_unused, h1, kk1, dc1, tm1 = _chunk_delta_fwd(      # no readouts (q unread)
                k, k, u1, eta1, g, gp, _state_reload(winT_ptr, base, D, E, BD, BE), rows, L,
                False, BT, PREC)
            o2_unused, h2, kk2, dc2, tm2 = _chunk_delta_fwd(
                hh, hh, u2, eta2, g, gp, _state_reload(woutT_ptr, base, E, D, BE, BD), rows, L,
                False, BT, PREC)
            tl.debug_barrier()                       # every read of the old state is done
            _store_state(winT_ptr, base, D, E, 0, h1, BD, BE)
            _store_state(woutT_ptr, base, E, D, 0, h2, BE, BD)


@triton.jit
def _read_bwd(sx, sh1, sh2, dr, dst_in_ptr, dst_out_ptr, base, D, E, ACT: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """The chain rule of one read R = X + s(X h1) h2 given dR: adds X^T dM and s(A)^T dR to
    the memory's carried state gradients (in dst_in/out at base) and returns dR + dM h1^T,
    its part of dX (triton_mlp_memory's `_self_target_bwd`; X, h1, h2 in their slots)."""
    dh1 = _state_reload(dst_in_ptr, base, D, E, BD, BE)
    dh2 = _state_reload(dst_out_ptr, base, E, D, BE, BD)
    dx, dh1, dh2 = _self_target_bwd(sx, sh1, sh2, dr, dh1, dh2, ACT, BT, BD, BE, PREC)
    tl.debug_barrier()
    _store_state(dst_in_ptr, base, D, E, 0, dh1, BD, BE)
    _store_state(dst_out_ptr, base, E, D, 0, dh2, BE, BD)
    return dx


@jit_any_length
def _hope_projections_bwd_kernel(x_ptr, w_eta_ptr, b_eta_ptr, w_alpha_ptr, b_alpha_ptr, k_ptr,
                                 v_ptr, eta_ptr, alpha_ptr, h1c_ptr, h2c_ptr, dk_ptr, dv_ptr,
                                 deta_ptr, dalpha_ptr, dwinT_ptr, dwoutT_ptr, dwinB_ptr,
                                 dwoutB_ptr, dx_ptr, dwin_ptr, dwout_ptr, dw_eta_ptr, db_eta_ptr,
                                 dw_alpha_ptr, db_alpha_ptr, scr_ptr, T, H, D, E, C, NT, S, eta_max,
                                 tau, DGD: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr,
                                 BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                                 PREC: tl.constexpr):
    """One (batch, head): the chunks in reverse (module docstring a-b). The memories' state
    gradients are carried in dwin / dwout (they start as the final states' gradients); the
    gate parameters' gradients are this program's partial sums ([B, H, .]: the host sums B)."""
    i_unused, bh64, g_base = _program(T, H)
    i_b, i_h = bh64 // H, bh64 % H
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    slots = scr_ptr + bh64 * (BWD_SLOTS * S)
    sx, sh1, sh2 = slots + DELTA_SLOTS * S, slots + (DELTA_SLOTS + 1) * S, slots + (DELTA_SLOTS + 2) * S
    base0 = (i_b * N_MEMORIES * H + i_h) * E * D
    step = H * E * D
    _copy_states(dwinT_ptr, dwoutT_ptr, dwin_ptr, dwout_ptr, base0, step, D, E, BD, BE)   # carried
    w_eta, b_eta, w_alpha, b_alpha = _gate_params(w_eta_ptr, b_eta_ptr, w_alpha_ptr,
                                                  b_alpha_ptr, i_h, cols, D)
    dw_eta = tl.zeros([BD], dtype=tl.float32)
    dw_alpha = tl.zeros([BD], dtype=tl.float32)
    db_eta = tl.sum(dw_eta, 0)
    db_alpha = tl.sum(dw_alpha, 0)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0, end, L = _chunk_span(i_t, C, T)
        valid = (t0 + rows) < end
        g, gp, lr, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
        kc = _load_rows(k_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        vc = _load_rows(v_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        dk = _load_rows(dk_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        dv = _load_rows(dv_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        deta = _load_gate(deta_ptr, g_base, t0, end, H, 0.0, BT)
        dalpha = _load_gate(dalpha_ptr, g_base, t0, end, H, 0.0, BT)
        # a. every memory's chunk step, from its saved start
        for i_m in range(N_MEMORIES):                # a runtime loop: one copy of the step's code
            bhm = (i_b * N_MEMORIES + i_m) * H + i_h
            base = base0 + i_m * step
            dq_unused, dk_m, dv_m, dlr_m, dla_m, dh1, dh2 = _dgd_chunk_bwd(   # no readouts
                kc, kc, vc, 0.0, g, gp, lr,
                _load_kv(h1c_ptr, (bhm * NT + i_t) * D * E, D, E, 0, BD, BE),
                _load_kv(h2c_ptr, (bhm * NT + i_t) * E * D, E, D, 0, BE, BD),
                _state_reload(dwin_ptr, base, D, E, BD, BE),
                _state_reload(dwout_ptr, base, E, D, BE, BD), slots, S, rows, L, tau, DGD, CLIP,
                ACT, True, False, BT, BD, BE, PREC)
            dk += dk_m
            dv += dv_m
            deta += dlr_m
            dalpha += _gate_grad(dla_m, alpha)
            if i_r == 0:                            # the returned W_B is this chunk's start
                dh1 += _load_state(dwinB_ptr, base, D, E, 0, BD, BE)
                dh2 += _load_state(dwoutB_ptr, base, E, D, 0, BE, BD)
            tl.debug_barrier()
            _store_state(dwin_ptr, base, D, E, 0, dh1, BD, BE)
            _store_state(dwout_ptr, base, E, D, 0, dh2, BE, BD)
        # b. the reads: k = R_k / ||R_k||, v = R_v, and the gates
        x = _load_rows(x_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        _spill(sx, x, BT, BD)
        dx = tl.zeros([BT, BD], dtype=tl.float32)
        for m in tl.static_range(N_MEMORIES):
            bhm = (i_b * N_MEMORIES + m) * H + i_h
            h1 = _load_kv(h1c_ptr, (bhm * NT + i_t) * D * E, D, E, 0, BD, BE)
            h2 = _load_kv(h2c_ptr, (bhm * NT + i_t) * E * D, E, D, 0, BE, BD)
            _spill(sh1, h1, BD, BE)
            _spill(sh2, h2, BE, BD)
            if m == 0:
                r = _self_target(x, h1, h2, ACT, PREC)
                norm = tl.sqrt(tl.sum(r * r, 1))
                n = tl.maximum(norm, 1e-12)
                kn = r / n[:, None]
                dr = dk / n[:, None] - tl.where(norm > 1e-12, tl.sum(kn * dk, 1) / n, 0.0)[:, None] * kn
            elif m == 1:
                dr = dv
            elif m == 2:
                r = _self_target(x, h1, h2, ACT, PREC)
                sig = tl.sigmoid(tl.sum(r * w_eta[None, :], 1) + b_eta)
                dl = tl.where(valid, deta * eta_max * sig * (1.0 - sig), 0.0)
                dw_eta += tl.sum(dl[:, None] * r, 0)
                db_eta += tl.sum(dl, 0)
                dr = dl[:, None] * w_eta[None, :]
            else:
                r = _self_target(x, h1, h2, ACT, PREC)
                sig = tl.sigmoid(tl.sum(r * w_alpha[None, :], 1) + b_alpha)
                dl = tl.where(valid, dalpha * sig * (1.0 - sig), 0.0)
                dw_alpha += tl.sum(dl[:, None] * r, 0)
                db_alpha += tl.sum(dl, 0)
                dr = dl[:, None] * w_alpha[None, :]
            dr = tl.where(valid[:, None], dr, 0.0)
            dx += _read_bwd(sx, sh1, sh2, dr, dwin_ptr, dwout_ptr, base0 + m * step, D, E, ACT,
                            BT, BD, BE, PREC)
        _store_rows(dx_ptr, g_base * D, t0, end, H * D, 0, D, dx, BT, BD)
    tl.store(dw_eta_ptr + bh64 * D + cols, dw_eta, mask=cols < D)
    tl.store(dw_alpha_ptr + bh64 * D + cols, dw_alpha, mask=cols < D)
    tl.store(db_eta_ptr + bh64, db_eta)
    tl.store(db_alpha_ptr + bh64, db_alpha)


def _launch_args(x, w_in, chunk_size, activation, max_grad_norm, dgd):
    B, T, H, d = x.shape
    E = w_in.shape[2]
    BT, BD, BE = _tiles(d, E, chunk_size)
    clip = max_grad_norm > 0
    return B, T, H, d, E, triton.cdiv(T, chunk_size), dict(
        tau=float(max_grad_norm) if clip else 1.0, DGD=dgd, CLIP=clip, ACT=ACT_IDS[activation],
        BT=BT, BD=BD, BE=BE, PREC=dot_precision(x.dtype))


@torch.library.custom_op("nested_learning::hope_projections_fwd", mutates_args=())
@on_input_device
def _hope_projections_fwd(x: Tensor, w_in: Tensor, w_out: Tensor, eta_weight: Tensor,
                          eta_bias: Tensor, alpha_weight: Tensor, alpha_bias: Tensor,
                          eta_max: float, chunk_size: int, dgd: bool, activation: str,
                          max_grad_norm: float, save_every: int) -> tuple[
                              Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor]:
    x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias = _contiguous(
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias)
    B, T, H, d, E, NT, consts = _launch_args(x, w_in, chunk_size, activation, max_grad_norm, dgd)
    k, v = x.new_empty(x.shape), x.new_empty(x.shape)        # x and w_* are contiguous here
    eta, alpha = x.new_empty(B, T, H), x.new_empty(B, T, H)
    states = [w.new_empty(w.shape) for w in (w_in, w_out, w_in, w_out)]
    every = max(save_every, 1)
    _, (h1c, h2c) = _state_buffers(B, len(PROJECTIONS) * H, d, E, triton.cdiv(NT, every), 2,
                                   save_every > 0, x.device)
    _hope_projections_fwd_kernel[(1, B * H)](
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, *states,
        h1c, h2c, T, H, d, E, chunk_size, NT, every, float(eta_max), SAVE=save_every > 0,
        **consts, num_warps=CHUNK_WARPS, num_stages=1)
    return (k, v, eta, alpha, *states, h1c, h2c)


@_hope_projections_fwd.register_fake
def _(x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, eta_max, chunk_size, dgd,
      activation, max_grad_norm, save_every):
    B, T, H, d = x.shape
    n_saved = triton.cdiv(triton.cdiv(T, chunk_size), max(save_every, 1))
    _, chunks = _state_buffers(B, len(PROJECTIONS) * H, d, w_in.shape[2], n_saved, 2,
                               save_every > 0, "meta")
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(B, T, H), x.new_empty(B, T, H),
            *(w.new_empty(w.shape) for w in (w_in, w_out, w_in, w_out)),
            *(x.new_empty(c.shape) for c in chunks))


@torch.library.custom_op("nested_learning::hope_projections_bwd", mutates_args=())
@on_input_device
def _hope_projections_bwd(x: Tensor, eta_weight: Tensor, eta_bias: Tensor, alpha_weight: Tensor,
                          alpha_bias: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor,
                          h1c: Tensor, h2c: Tensor, grad_k: Tensor, grad_v: Tensor,
                          grad_eta: Tensor, grad_alpha: Tensor, grad_win: Tensor,
                          grad_wout: Tensor, grad_win_start: Tensor, grad_wout_start: Tensor,
                          eta_max: float, chunk_size: int, dgd: bool, activation: str,
                          max_grad_norm: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                         Tensor, Tensor]:
    tensors = _contiguous(x, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, h1c,
                          h2c, grad_k, grad_v, grad_eta, grad_alpha, grad_win, grad_wout,
                          grad_win_start, grad_wout_start)
    B, T, H, d, E, NT, consts = _launch_args(x, grad_win, chunk_size, activation, max_grad_norm, dgd)
    # the kernel writes row-major: new buffers, not empty_like (which keeps an input's strides)
    dx = x.new_empty(x.shape)
    dwin, dwout = x.new_empty(grad_win.shape), x.new_empty(grad_wout.shape)
    dw_eta, dw_alpha = x.new_empty(B, H, d), x.new_empty(B, H, d)
    db_eta, db_alpha = x.new_empty(B, H), x.new_empty(B, H)
    scratch, S = _scratch(x, E, chunk_size, BWD_SLOTS.value)
    _hope_projections_bwd_kernel[(1, B * H)](
        *tensors, dx, dwin, dwout, dw_eta, db_eta, dw_alpha, db_alpha, scratch, T, H, d, E,
        chunk_size, NT, S, float(eta_max), **consts, num_warps=CHUNK_WARPS, num_stages=1)
    return dx, dwin, dwout, dw_eta.sum(0), db_eta.sum(0), dw_alpha.sum(0), db_alpha.sum(0)


@_hope_projections_bwd.register_fake
def _(x, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, h1c, h2c, grad_k, grad_v,
      grad_eta, grad_alpha, grad_win, grad_wout, grad_win_start, grad_wout_start, eta_max,
      chunk_size, dgd, activation, max_grad_norm):
    return (x.new_empty(x.shape), grad_win.new_empty(grad_win.shape),
            grad_wout.new_empty(grad_wout.shape), *(t.new_empty(t.shape) for t in
                                                    (eta_weight, eta_bias, alpha_weight, alpha_bias)))


def _setup_context(ctx, inputs, output):
    (x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, eta_max, chunk_size, dgd,
     activation, max_grad_norm, save_every) = inputs
    k, v, eta, alpha, *_, h1c, h2c = output
    ctx.save_for_backward(x, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, h1c, h2c)
    ctx.args = (eta_max, chunk_size, dgd, activation, max_grad_norm)
    ctx.save_every = save_every
    ctx.mark_non_differentiable(h1c, h2c)


def _backward(ctx, grad_k, grad_v, grad_eta, grad_alpha, grad_win, grad_wout, grad_win_start,
              grad_wout_start, _grad_h1c, _grad_h2c):
    x, eta_weight, eta_bias, alpha_weight, alpha_bias, k, v, eta, alpha, h1c, h2c = ctx.saved_tensors
    check_saved_chunks(h1c, "fused_hope_projections")
    B, T, H, d = x.shape
    n, E = len(PROJECTIONS), h1c.shape[-1]
    rows = [_grad_or_zeros(g, x.shape, x) for g in (grad_k, grad_v)]
    gates = [_grad_or_zeros(g, (B, T, H), x) for g in (grad_eta, grad_alpha)]
    states = [_grad_or_zeros(g, (B, n * H, E, d) if i % 2 == 0 else (B, n * H, d, E), x)
              for i, g in enumerate((grad_win, grad_wout, grad_win_start, grad_wout_start))]
    params = (eta_weight, eta_bias, alpha_weight, alpha_bias)
    if ctx.save_every == 1:
        grads = torch.ops.nested_learning.hope_projections_bwd(
            x, *params, k, v, eta, alpha, h1c, h2c, *rows, *gates, *states, *ctx.args)
        return (*grads, None, None, None, None, None, None)
    # blocks of save_every chunks, last first, each re-run forward from its saved start
    dx = x.new_empty(x.shape)
    param_grads = [torch.zeros_like(p) for p in params]      # summed over the blocks

    def block_step(i_s, t0, t1, carried, start_grads):
        xs = x[:, t0:t1]
        k_b, v_b, eta_b, alpha_b, *_, h1_b, h2_b = torch.ops.nested_learning.hope_projections_fwd(
            xs, saved_weights(h1c, i_s, B), saved_weights(h2c, i_s, B), *params, *ctx.args, 1)
        dx_b, dwin, dwout, *grads = torch.ops.nested_learning.hope_projections_bwd(
            xs, *params, k_b, v_b, eta_b, alpha_b, h1_b, h2_b, *(g[:, t0:t1] for g in rows + gates),
            *carried, *start_grads, *ctx.args)
        for total, g in zip(param_grads, grads):
            total += g
        return (dx_b,), (dwin, dwout)

    dwin, dwout = backward_in_blocks(T, ctx.args[1], ctx.save_every, [dx], states[:2], states[2:],
                                     block_step)
    return (dx, dwin, dwout, *param_grads, None, None, None, None, None, None)


_hope_projections_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_hope_projections(x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias,
                           eta_max, chunk_size, dgd=True, activation="silu", max_grad_norm=None,
                           state_every=None):
    """HOPE's stage 1 over a segment that starts at a chunk boundary (module docstring).
    x [B,T,H,d] fp32 (the features x~); w_in [B,4H,E,d], w_out [B,4H,d,E] fp32 (the stacked
    memories in PROJECTIONS order, memory-major); eta_weight, alpha_weight [H,d]; eta_bias,
    alpha_bias [H]. Returns (k, v [B,T,H,d], eta, alpha [B,T,H], (W_in, W_out) after the last
    token, (W_in, W_out) at the last chunk's start); gradients flow to every tensor input.
    state_every: the forward keeps every R-th chunk start for the backward, which re-runs the
    forward per block of R chunks (triton_mlp_memory.save_interval; None = its choice)."""
    tensors = {"x": x, "w_in": w_in, "w_out": w_out, "eta_weight": eta_weight,
               "eta_bias": eta_bias, "alpha_weight": alpha_weight, "alpha_bias": alpha_bias}
    check_tensors(tensors, "x", SUPPORTED_DTYPES[:1], "fused_hope_projections")
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
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or E % d
            or not fusable_projections(d, E // d, chunk_size)):
        raise ValueError(f"head dim {d}, hidden {E}, chunk_size {chunk_size!r}: not a shape the "
                         f"fused stage 1 takes (fusable_projections)")
    check_options(activation, max_grad_norm)
    check_constant("eta_max", eta_max, positive=True)
    every = resolve_state_every(T, chunk_size, state_every)
    k, v, eta, alpha, win_T, wout_T, win_B, wout_B, *_ = torch.ops.nested_learning.hope_projections_fwd(
        x, w_in, w_out, eta_weight, eta_bias, alpha_weight, alpha_bias, float(eta_max), chunk_size,
        bool(dgd), activation, 0.0 if max_grad_norm is None else float(max_grad_norm),
        every if _needs_grad(*tensors.values()) else 0)
    return k, v, eta, alpha, (win_T, wout_T), (win_B, wout_B)
