"""Fused Triton kernels for one CMS fast level over a segment (NL §7 Eq. 71; DESIGN §3.5, §4 (b)).

The math (cms.py's module docstring has the model). Per sequence b the fast weights are
theta = (W1 = w_in [H, D], W2 = w_out [D, H]); a chunk piece reads rows A [n, D] (the level's
normed inputs) with targets Tg [n, D] (W_v a_t) at its chunk-start theta:

    P  = A W1^T          Hh = act(P)        S1 = act'(P)              [n, H]
    Y  = Hh W2^T                                                      [n, D]  (the output)
    E  = 2 (Y - Tg)                                 d/dY of sum_t ||Y_t - Tg_t||^2
    G2 = E^T Hh          M = E W2           G1 = (M o S1)^T A         the closed-form gradients
    theta_{c+1} = theta_c - lr (G_carry + G)        when the piece completes chunk c

A piece is the rest of a chunk begun in an earlier segment (G_carry = the state's grad_in /
grad_out), a whole chunk, or the start of the last chunk (its G becomes the new state's grads).
Chunks are aligned to absolute positions: with off = pos % C, piece i of the segment covers
tokens [max(0, iC - off), min(T, (i+1)C - off)) and completes its chunk iff (i+1)C - off <= T.

Forward: one program per sequence runs the whole piece loop. D sits in one tile, the hidden
dimension is tiled (BH columns at a time): a first pass over hidden blocks sums Y (needed whole
for E), a second takes G1, G2 block by block and steps theta block by block (each block of W1,
W2 is read and written only by its own step, so no full weight matrix is ever in registers).
When gradients are needed the chunk-start weights of every piece (T/C of them: slot i+1 =
slot i - lr G) and E are saved; otherwise two weight slots are used in turn.

Backward: the same program walks the pieces in reverse, carrying the adjoint of the weights at
the start of the next piece, dtheta_next (initialised with the final weights' gradient). With
dG = -lr dtheta_next for a completed piece (the step's G path) or the final grads' gradient
for an unfinished last piece, and dY the output's gradient, reverse-mode through the piece is

    dGp = A dG1^T        dM = dGp o S1      dS1 = dGp o M          (Gp = M o S1)
    dE  = dM W2^T + Hh dG2^T                dTg = -2 dE            dY~ = dY + 2 dE
    dHh = dY~ W2 + E dG2                    dP = dHh o S1 + dS1 o act''(P)
    dA  = Gp dG1 + dP W1
    dW1 = dtheta_next,1 + dP^T A            dW2 = dtheta_next,2 + E^T dM + dY~^T Hh

dE sums over all hidden blocks before dY~ exists, so this is again two passes over hidden
(P, Hh, M recomputed from the saved chunk-start weights and E). The act'' terms are the
second-order part of the inner step: exact-erf GELU act = x Phi(x), act'' = phi(x) (2 - x^2);
SiLU act = x s(x), act'' = s (1 - s) (2 + x (1 - 2 s)). The gradient to the carried grads is
the dG of piece 0; to the initial weights, dtheta after piece 0.

    fused_fast_level(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation)
        -> (y, w_in, w_out, grad_in, grad_out, pos)     (cms.fast_level_scan's contract)

Parallelism is B programs (a fast level has no heads): the piece loop is sequential and E
needs Y summed over all of hidden, so hidden blocks stay in one program. Small batches leave
most of a GPU idle; the gain over the torch scan is the ~15 launches per chunk it saves.

fp32 only (the state is fp32; callers cast); products as triton_delta.dot_precision says
(exact fp32 at PyTorch's default matmul precision, tf32 at "high"). D <= 128,
hidden <= 4096, C <= 64 (C <= 32 when D > 64): a piece is one [BT, BD] tile of rows.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import check_constant, check_saved_chunks, check_tensors
from .triton_delta import (_contiguous, _dot, _grad_or_zeros, _load_rows, _needs_grad, _store_rows,
                           dot_precision, jit_any_length, on_input_device)

__all__ = ["fused_fast_level", "fusable_cms", "MAX_DIM", "MAX_HIDDEN", "max_cms_chunk"]

MAX_DIM = 128          # the whole model dim sits in one register tile
MAX_HIDDEN = 4096      # hidden is tiled; the bound only keeps the saved weights reasonable
MAX_CHUNK = 64
ACT_IDS = {"gelu": 0, "silu": 1}


@triton.jit
def _act(p, ACT: tl.constexpr, ORDER: tl.constexpr):
    """(act(p), act'(p), act''(p) if ORDER == 2 else 0): exact-erf GELU (ACT 0) or SiLU (1)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476))
        pdf = tl.exp(-0.5 * p * p) * 0.3989422804014327
        h, s1 = p * cdf, cdf + p * pdf
        s2 = pdf * (2.0 - p * p) if ORDER == 2 else 0.0 * p
    else:
        sig = tl.sigmoid(p)
        h, s1 = p * sig, sig * (1.0 + p * (1.0 - sig))
        s2 = sig * (1.0 - sig) * (2.0 + p * (1.0 - 2.0 * sig)) if ORDER == 2 else 0.0 * p
    return h, s1, s2


@triton.jit
def _piece(i, T, C, off):
    """Segment rows [s, e) of piece i and whether it completes its chunk."""
    s = tl.maximum(i * C - off, 0)
    e = tl.minimum((i + 1) * C - off, T)
    return s, e, (i + 1) * C - off <= T


@jit_any_length
def _cms_fwd_kernel(a_ptr, tg_ptr, w1_ptr, w2_ptr, g1c_ptr, g2c_ptr, y_ptr, e_ptr, g1o_ptr,
                    g2o_ptr, T, D, H, C, off, lr, NP, SLOTS, SAVE: tl.constexpr,
                    ACT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                    PREC: tl.constexpr):
    """One sequence, every piece: y, (SAVE) E, the stepped weights (slot i -> slot i+1; without
    SAVE two slots in turn) and the unfinished chunk's grads."""
    b = tl.program_id(0).to(tl.int64)
    tok = b * T * D
    hd = H * D
    for i in range(NP):
        s, e, complete = _piece(i, T, C, off)
        src = b * SLOTS + (i if SAVE else i % 2)
        dst = b * SLOTS + (i + 1 if SAVE else (i + 1) % 2)
        a = _load_rows(a_ptr, tok, s, e, D, 0, D, BT, BD)
        tg = _load_rows(tg_ptr, tok, s, e, D, 0, D, BT, BD)
        y = tl.zeros([BT, BD], dtype=tl.float32)
        for j0 in range(0, H, BH):                     # pass 1: Y = act(A W1^T) W2^T
            w1 = _load_rows(w1_ptr, src * hd, j0, H, D, 0, D, BH, BD)      # [BH, BD]
            w2 = _load_rows(w2_ptr, src * hd, 0, D, H, j0, H, BD, BH)      # [BD, BH]
            h, s1, s2 = _act(_dot(a, tl.trans(w1), PREC), ACT, 1)
            y += _dot(h, tl.trans(w2), PREC)
        err = 2.0 * (y - tg)
        _store_rows(y_ptr, tok, s, e, D, 0, D, y, BT, BD)
        if SAVE:
            _store_rows(e_ptr, tok, s, e, D, 0, D, err, BT, BD)
        tl.debug_barrier()
        for j0 in range(0, H, BH):                     # pass 2: G, and the step theta_{c+1}
            w1 = _load_rows(w1_ptr, src * hd, j0, H, D, 0, D, BH, BD)
            w2 = _load_rows(w2_ptr, src * hd, 0, D, H, j0, H, BD, BH)
            h, s1, s2 = _act(_dot(a, tl.trans(w1), PREC), ACT, 1)
            g2 = _dot(tl.trans(err), h, PREC)                                        # [BD, BH]
            gp = _dot(err, w2, PREC) * s1                                             # [BT, BH]
            g1 = _dot(tl.trans(gp), a, PREC)                                          # [BH, BD]
            if i == 0:                                 # the chunk begun in an earlier segment
                g1 += _load_rows(g1c_ptr, b * hd, j0, H, D, 0, D, BH, BD)
                g2 += _load_rows(g2c_ptr, b * hd, 0, D, H, j0, H, BD, BH)
            if complete:
                _store_rows(w1_ptr, dst * hd, j0, H, D, 0, D, w1 - lr * g1, BH, BD)
                _store_rows(w2_ptr, dst * hd, 0, D, H, j0, H, w2 - lr * g2, BD, BH)
            else:
                _store_rows(g1o_ptr, b * hd, j0, H, D, 0, D, g1, BH, BD)
                _store_rows(g2o_ptr, b * hd, 0, D, H, j0, H, g2, BD, BH)
        tl.debug_barrier()


@jit_any_length
def _cms_bwd_kernel(a_ptr, w1_ptr, w2_ptr, e_ptr, dy_ptr, dg1f_ptr, dg2f_ptr, dw1_ptr, dw2_ptr,
                    da_ptr, dtg_ptr, dg1c_ptr, dg2c_ptr, T, D, H, C, off, lr, NP,
                    ACT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                    PREC: tl.constexpr):
    """One sequence, pieces in reverse (module docstring). dw1/dw2 hold dtheta_next on entry
    (the final weights' gradient) and are overwritten in place with dtheta of each piece's
    start, ending with the gradient of the initial weights."""
    b = tl.program_id(0).to(tl.int64)
    tok = b * T * D
    hd = H * D
    for r in range(NP):
        i = NP - 1 - r
        s, e, complete = _piece(i, T, C, off)
        src = (b * (NP + 1) + i) * hd
        a = _load_rows(a_ptr, tok, s, e, D, 0, D, BT, BD)
        err = _load_rows(e_ptr, tok, s, e, D, 0, D, BT, BD)
        de = tl.zeros([BT, BD], dtype=tl.float32)
        da = tl.zeros([BT, BD], dtype=tl.float32)
        for j0 in range(0, H, BH):                     # pass A: dE, and dA's Gp dG1 term
            w1 = _load_rows(w1_ptr, src, j0, H, D, 0, D, BH, BD)
            w2 = _load_rows(w2_ptr, src, 0, D, H, j0, H, BD, BH)
            if complete:
                dg1 = -lr * _load_rows(dw1_ptr, b * hd, j0, H, D, 0, D, BH, BD)
                dg2 = -lr * _load_rows(dw2_ptr, b * hd, 0, D, H, j0, H, BD, BH)
            else:
                dg1 = _load_rows(dg1f_ptr, b * hd, j0, H, D, 0, D, BH, BD)
                dg2 = _load_rows(dg2f_ptr, b * hd, 0, D, H, j0, H, BD, BH)
            if i == 0:                                 # gradient of the carried grads
                _store_rows(dg1c_ptr, b * hd, j0, H, D, 0, D, dg1, BH, BD)
                _store_rows(dg2c_ptr, b * hd, 0, D, H, j0, H, dg2, BD, BH)
            h, s1, s2 = _act(_dot(a, tl.trans(w1), PREC), ACT, 1)
            m = _dot(err, w2, PREC)
            dm = _dot(a, tl.trans(dg1), PREC) * s1
            de += (_dot(dm, tl.trans(w2), PREC)
                   + _dot(h, tl.trans(dg2), PREC))
            da += _dot(m * s1, dg1, PREC)
        dyt = _load_rows(dy_ptr, tok, s, e, D, 0, D, BT, BD) + 2.0 * de
        _store_rows(dtg_ptr, tok, s, e, D, 0, D, -2.0 * de, BT, BD)
        tl.debug_barrier()
        for j0 in range(0, H, BH):                     # pass B: dP, dA, dtheta of the piece start
            w1 = _load_rows(w1_ptr, src, j0, H, D, 0, D, BH, BD)
            w2 = _load_rows(w2_ptr, src, 0, D, H, j0, H, BD, BH)
            dwn1 = _load_rows(dw1_ptr, b * hd, j0, H, D, 0, D, BH, BD)
            dwn2 = _load_rows(dw2_ptr, b * hd, 0, D, H, j0, H, BD, BH)
            if complete:
                dg1, dg2 = -lr * dwn1, -lr * dwn2
            else:
                dg1 = _load_rows(dg1f_ptr, b * hd, j0, H, D, 0, D, BH, BD)
                dg2 = _load_rows(dg2f_ptr, b * hd, 0, D, H, j0, H, BD, BH)
            h, s1, s2 = _act(_dot(a, tl.trans(w1), PREC), ACT, 2)
            m = _dot(err, w2, PREC)
            dgp = _dot(a, tl.trans(dg1), PREC)
            dh = (_dot(dyt, w2, PREC)
                  + _dot(err, dg2, PREC))
            dp = dh * s1 + dgp * m * s2
            da += _dot(dp, w1, PREC)
            dwn1 += _dot(tl.trans(dp), a, PREC)
            dwn2 += (_dot(tl.trans(err), dgp * s1, PREC)
                     + _dot(tl.trans(dyt), h, PREC))
            _store_rows(dw1_ptr, b * hd, j0, H, D, 0, D, dwn1, BH, BD)
            _store_rows(dw2_ptr, b * hd, 0, D, H, j0, H, dwn2, BD, BH)
        _store_rows(da_ptr, tok, s, e, D, 0, D, da, BT, BD)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- host side

def max_cms_chunk(D):
    """Largest chunk the kernels take at model dim D: 64, or 32 when D > 64 (the [BT, BD]
    row tiles a, E, dE, dA, dY~ stay in registers)."""
    return MAX_CHUNK if D <= 64 else MAX_CHUNK // 2


def fusable_cms(D, hidden, C):
    """Whether the fused kernels cover a fast level of model dim D, hidden width and chunk C."""
    return 1 <= D <= MAX_DIM and 1 <= hidden <= MAX_HIDDEN and 1 <= C <= max_cms_chunk(D)


def _tiles(D, H, C):
    """(BT, BD, BH): one piece per BT rows (tl.dot needs >= 16), hidden in blocks of BH. The
    backward holds six [BH, BD] weight-shaped tiles at once, so BH shrinks as D grows."""
    BD = max(16, triton.next_power_of_2(D))
    return (max(16, triton.next_power_of_2(C)), BD,
            min(16 if BD > 64 else 32, max(16, triton.next_power_of_2(H))))


def _warps(BD):
    return 8 if BD > 64 else 4


def _pieces(T, pos, C):
    """Number of chunk pieces of a T-token segment starting at absolute position pos."""
    return (T + pos % C + C - 1) // C


def _completes(T, pos, C):
    """Whether the segment ends on a chunk boundary (its last piece steps theta)."""
    return (pos + T) % C == 0


@torch.library.custom_op("nested_learning::cms_fast_level_fwd", mutates_args=())
@on_input_device
def _cms_fwd(a: Tensor, target: Tensor, w_in: Tensor, w_out: Tensor, grad_in: Tensor,
             grad_out: Tensor, pos: int, chunk_size: int, lr: float, activation: str,
             save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a, target, grad_in, grad_out = _contiguous(a, target, grad_in, grad_out)
    B, T, D = a.shape
    H, C = w_in.shape[1], chunk_size
    NP = _pieces(T, pos, C)
    slots = NP + 1 if save else 2
    w1s = a.new_empty(B, slots, H, D)
    w2s = a.new_empty(B, slots, D, H)
    w1s[:, 0].copy_(w_in)
    w2s[:, 0].copy_(w_out)
    y = torch.empty_like(a)
    err = torch.empty_like(a) if save else a.new_empty(0)        # E, kept for the backward
    g1o, g2o = torch.zeros_like(grad_in), torch.zeros_like(grad_out)
    BT, BD, BH = _tiles(D, H, C)
    _cms_fwd_kernel[(B,)](a, target, w1s, w2s, grad_in, grad_out, y, err, g1o, g2o, T, D, H, C,
                          pos % C, lr, NP, slots, SAVE=save, ACT=ACT_IDS[activation], BT=BT,
                          BD=BD, BH=BH, PREC=dot_precision(a.dtype), num_warps=_warps(BD))
    steps = NP - (0 if _completes(T, pos, C) else 1)          # theta updates in the segment
    final = steps if save else steps % 2
    w1f, w2f = w1s[:, final].clone(), w2s[:, final].clone()
    if not save:
        w1s, w2s = a.new_empty(0), a.new_empty(0)
    return y, w1f, w2f, g1o, g2o, w1s, w2s, err


@_cms_fwd.register_fake
def _(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation, save):
    B, T, D = a.shape
    H = w_in.shape[1]
    slots = _pieces(T, pos, chunk_size) + 1
    return (a.new_empty(a.shape), a.new_empty(B, H, D), a.new_empty(B, D, H), a.new_empty(B, H, D),
            a.new_empty(B, D, H), a.new_empty((B, slots, H, D) if save else (0,)),
            a.new_empty((B, slots, D, H) if save else (0,)), a.new_empty(a.shape if save else (0,)))


@torch.library.custom_op("nested_learning::cms_fast_level_bwd", mutates_args=())
@on_input_device
def _cms_bwd(a: Tensor, w1s: Tensor, w2s: Tensor, err: Tensor, grad_y: Tensor,
             grad_w_in: Tensor, grad_w_out: Tensor, grad_g_in: Tensor, grad_g_out: Tensor,
             pos: int, chunk_size: int, lr: float, activation: str
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a, grad_y, grad_g_in, grad_g_out = _contiguous(a, grad_y, grad_g_in, grad_g_out)
    B, T, D = a.shape
    H, C = w1s.shape[2], chunk_size
    NP = _pieces(T, pos, C)
    dw1, dw2 = grad_w_in.clone(memory_format=torch.contiguous_format), grad_w_out.clone(
        memory_format=torch.contiguous_format)
    da, dtg = torch.empty_like(a), torch.empty_like(a)
    dg1c, dg2c = torch.empty_like(dw1), torch.empty_like(dw2)
    BT, BD, BH = _tiles(D, H, C)
    _cms_bwd_kernel[(B,)](a, w1s, w2s, err, grad_y, grad_g_in, grad_g_out, dw1, dw2, da, dtg,
                          dg1c, dg2c, T, D, H, C, pos % C, lr, NP, ACT=ACT_IDS[activation],
                          BT=BT, BD=BD, BH=BH, PREC=dot_precision(a.dtype), num_warps=_warps(BD))
    return da, dtg, dw1, dw2, dg1c, dg2c


@_cms_bwd.register_fake
def _(a, w1s, w2s, err, grad_y, grad_w_in, grad_w_out, grad_g_in, grad_g_out, pos, chunk_size,
      lr, activation):
    # the op makes its inputs contiguous first: new row-major buffers, not empty_like (which
    # keeps a permuted input's strides)
    return tuple(t.new_empty(t.shape) for t in (a, a, grad_w_in, grad_w_out, grad_w_in, grad_w_out))


def _cms_setup_context(ctx, inputs, output):
    a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation, save = inputs
    ctx.save_for_backward(a, output[5], output[6], output[7])
    ctx.args = (pos, chunk_size, lr, activation)
    ctx.mark_non_differentiable(output[5], output[6], output[7])


def _cms_backward(ctx, grad_y, grad_w_in, grad_w_out, grad_g_in, grad_g_out, _g1s, _g2s, _gerr):
    a, w1s, w2s, err = ctx.saved_tensors
    check_saved_chunks(w1s, "fused_fast_level")
    B, T, D = a.shape
    H = w1s.shape[2]
    grads = torch.ops.nested_learning.cms_fast_level_bwd(
        a, w1s, w2s, err, _grad_or_zeros(grad_y, (B, T, D), a),
        _grad_or_zeros(grad_w_in, (B, H, D), a), _grad_or_zeros(grad_w_out, (B, D, H), a),
        _grad_or_zeros(grad_g_in, (B, H, D), a), _grad_or_zeros(grad_g_out, (B, D, H), a),
        *ctx.args)
    return (*grads, None, None, None, None, None)


_cms_fwd.register_autograd(_cms_backward, setup_context=_cms_setup_context)


def _check(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation):
    """One-line ValueErrors naming what is wrong."""
    named = {"a": a, "target": target, "w_in": w_in, "w_out": w_out, "grad_in": grad_in,
             "grad_out": grad_out}
    check_tensors({n: t for n, t in named.items() if t is not None or not n.startswith("grad_")},
                  "a", (torch.float32,), "the fused CMS kernels")
    if a.dim() != 3 or a.shape[1] == 0:
        raise ValueError(f"a must be [B, T, D] with T >= 1; got shape {list(a.shape)}")
    B, T, D = a.shape
    if target.shape != a.shape:
        raise ValueError(f"target must be [B, T, D] = {list(a.shape)} like a; got {list(target.shape)}")
    if w_in.dim() != 3 or w_in.shape[0] != B or w_in.shape[2] != D:
        raise ValueError(f"w_in must be [B, hidden, D] with B={B}, D={D}; got {list(w_in.shape)}")
    H = w_in.shape[1]
    expected = {"w_out": (B, D, H), "grad_in": (B, H, D), "grad_out": (B, D, H)}
    for name, shape in expected.items():
        if named[name] is not None and named[name].shape != shape:
            raise ValueError(f"{name} must be {list(shape)}; got {list(named[name].shape)}")
    if (grad_in is None) != (grad_out is None):
        raise ValueError("grad_in and grad_out must both be tensors or both be None")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    if not fusable_cms(D, H, chunk_size):
        raise ValueError(f"the fused CMS kernels take D <= {MAX_DIM}, hidden <= {MAX_HIDDEN}, "
                         f"C <= {max_cms_chunk(D)}; got D={D}, hidden={H}, C={chunk_size}")
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise ValueError(f"pos must be an int >= 0; got {pos!r}")
    check_constant("lr", lr)
    if activation not in ACT_IDS:
        raise ValueError(f"activation must be one of {', '.join(ACT_IDS)}; got {activation!r}")


def fused_fast_level(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr,
                     activation="gelu"):
    """cms.fast_level_scan in one fused launch (forward) and one (backward); same arguments
    and returns: y [B, T, D], then w_in, w_out (the weights at the start of the chunk holding
    position pos + T), grad_in, grad_out (the unfinished chunk's grads, None when the segment
    ends on a chunk boundary) and pos + T. Gradients flow to a, target, w_in, w_out and the
    carried grads; lr is a constant. fp32 inputs, T >= 1."""
    _check(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation)
    if grad_in is None:
        grad_in, grad_out = a.new_zeros(w_in.shape), a.new_zeros(w_out.shape)
    tensors = (a, target, w_in, w_out, grad_in, grad_out)
    save = _needs_grad(*tensors)
    y, w1, w2, g1, g2, _, _, _ = torch.ops.nested_learning.cms_fast_level_fwd(
        *tensors, pos, chunk_size, float(lr), activation, save)
    T = a.shape[1]
    if _completes(T, pos, chunk_size):
        g1 = g2 = None
    return y, w1, w2, g1, g2, pos + T
