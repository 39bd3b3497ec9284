"""Continuum Memory System (NL §7, Eq. 70-71; DESIGN §3.5): the channel mixer of HOPE.

A chain of MLP levels replaces the FFN of a block (NL Eq. 70):

    z_0 = h                                   (the block's pre-normed input)
    z_l = z_{l-1} + MLP_l(a_t),   a_t = RMSNorm_l(z_{l-1})        l = 1..k
    output = z_k - z_0 = sum_l MLP_l(a_t)      (Block adds its own residual: x + output)

Every level is the same 2-layer MLP, MLP_l(a) = W_out act(W_in a) (no biases); its chunk
size C_l decides how it learns:

* static (C_l = null): W_in, W_out are plain parameters, learned by the outer optimiser only.
* fast (C_l = C): each sequence has its own copy theta = (W_in, W_out), initialised from the
  outer-learned parameters at the start of the sequence and updated every C tokens by one
  step of gradient descent on a local reconstruction objective (NL Eq. 71, TTT-style target):

      l_l(theta; a_t) = || MLP_l(a_t; theta) - W_v,l a_t ||^2          (W_v,l outer-learned)
      theta_{c+1}     = theta_c - lr_l * sum_{t in chunk c} grad l_l(theta_c; a_t)

  Tokens of chunk c are read with theta_c, the weights at the start of their chunk, so no
  token sees an update its own chunk contributed to (causal), and within a chunk all reads
  and all gradients are parallel. Chunks are aligned to absolute positions from the start
  of the sequence (chunk c = tokens [c C, (c+1) C)).

The inner gradient is written in closed form (`local_objective_grads`) with differentiable
torch ops, so outer gradients flow through every update into the initial weights and W_v
(the "meta" parameters, NL §7.1: initial states learned by the outer level).

State (what a later segment needs; `None` = start of a sequence, fast weights reset):

    state = {"levels": [level_state or None for each level]}    None for static levels
    level_state = {
        "w_in":     [B, hidden, D]  fast W_in at the start of the current chunk (theta_c)
        "w_out":    [B, D, hidden]  fast W_out at the start of the current chunk
        "grad_in":  [B, hidden, D]  sum of grad l over the tokens seen so far of the current
        "grad_out": [B, D, hidden]  chunk (None while that partial chunk is empty)
        "pos":      int             absolute position of the next token (chunk offset = pos % C)
    }
The four tensors are float32 at least, also in a bf16 model (`CMSLevel.initial_state`).

Because the update is a sum of per-token gradients at the fixed theta_c, accumulating the
partial chunk's gradient is exact: one call on a sequence == consecutive segments of any
lengths with the state carried.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from config import ModelConfig
from memory import ACTIVATIONS, FWD_BWD, activation_fns, chunk_pieces
from model import RMSNorm, hidden_width


def local_objective_grads(a, target, w_in, w_out, activation="gelu"):
    """Read the MLP and take the gradient of its local objective, both at (w_in, w_out).

    a, target [B, n, D]; w_in [B, hidden, D]; w_out [B, D, hidden] (row-vector convention:
    MLP(a) = act(a W_in^T) W_out^T). Returns (y, grad_in, grad_out): y = MLP(a) [B, n, D] and
    the gradients of sum_t ||MLP(a_t) - target_t||^2 over the n tokens. Closed form (the
    backward of a 2-layer MLP written out), so it costs 5 batched matmuls and autograd can
    differentiate through it for the outer gradients. The matmuls run at a's precision (the
    weights are cast to it, as autocast would), so a bf16 model reads and differentiates its
    fast weights in bf16 while fast_level_scan keeps them in float32.
    """
    w_in, w_out = w_in.to(a.dtype), w_out.to(a.dtype)
    pre = torch.matmul(a, w_in.transpose(-1, -2))                 # [B, n, hidden]
    act, act_deriv = activation_fns(activation)
    hidden, act_grad = act(pre), act_deriv(pre)
    y = torch.matmul(hidden, w_out.transpose(-1, -2))             # [B, n, D]
    err = 2.0 * (y - target)                                       # d l / d y
    grad_out = torch.matmul(err.transpose(-1, -2), hidden)         # [B, D, hidden]
    grad_pre = torch.matmul(err, w_out) * act_grad                 # [B, n, hidden]
    grad_in = torch.matmul(grad_pre.transpose(-1, -2), a)          # [B, hidden, D]
    return y, grad_in, grad_out


def fast_level_scan(a, target, w_in, w_out, grad_in, grad_out, pos, chunk_size, lr, activation="gelu"):
    """Run one fast level over a segment (NL Eq. 71), chunk by chunk.

    a, target [B, T, D]: the level's normed inputs a_t and targets W_v a_t. (w_in, w_out) are
    the weights at the start of the chunk containing absolute position `pos`; (grad_in,
    grad_out) the gradient already accumulated over that chunk's first pos % C tokens (None
    when there are none). Returns y [B, T, D] and the same five state values after the segment.
    The Python loop is over chunk pieces only: a piece is the rest of a partial chunk, a full
    chunk, or the start of the last chunk.
    """
    outputs, start_pos = [], pos
    for lo, hi in chunk_pieces(start_pos, a.shape[1], chunk_size):
        y, g_in, g_out = local_objective_grads(a[:, lo:hi], target[:, lo:hi], w_in, w_out, activation)
        g_in, g_out = g_in.to(w_in.dtype), g_out.to(w_out.dtype)   # sums and steps at the state's precision
        outputs.append(y)
        grad_in = g_in if grad_in is None else grad_in + g_in
        grad_out = g_out if grad_out is None else grad_out + g_out
        pos = start_pos + hi
        if pos % chunk_size == 0:                                  # chunk complete: theta_{c+1}
            w_in = w_in - lr * grad_in
            w_out = w_out - lr * grad_out
            grad_in = grad_out = None
    y = torch.cat(outputs, dim=1) if outputs else a.new_zeros(a.shape)
    return y, w_in, w_out, grad_in, grad_out, pos


class CMSLevel(nn.Module):
    """One level: z -> z + MLP(RMSNorm(z)); static (chunk_size None) or fast (see module doc).
    `backend` picks the fast level's scan: "triton" runs the fused kernel where it applies
    (uses_fused_kernel); "auto" never picks it yet (no GPU run has timed it in a model) and,
    like "torch" and "reference", takes fast_level_scan."""

    def __init__(self, dim, hidden, chunk_size, inner_lr, activation, norm_eps, backend="auto"):
        super().__init__()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"CMS backend must be one of {', '.join(kernels.BACKENDS)}; got {backend!r}")
        self.chunk_size, self.inner_lr, self.activation = chunk_size, inner_lr, activation
        self.backend = backend
        self.norm = RMSNorm(dim, norm_eps)
        # Static weights, or the outer-learned initial fast weights theta_0 (NL §7.1).
        self.w_in = nn.Linear(dim, hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.w_out.is_residual_proj = True
        # W_v of the local objective ||MLP(a) - W_v a||^2: only fast levels have one.
        self.w_target = nn.Linear(dim, dim, bias=False) if chunk_size is not None else None

    @property
    def is_fast(self):
        return self.chunk_size is not None

    def initial_state(self, batch_size, pos=0):
        """Fast weights at the start of a sequence: theta_0 for every sequence (differentiable).
        They are float32 at least, also in a bf16 model (docs/FIDELITY.md "Fast weights in
        float32"): an update lr_l * G is far below bf16's resolution of the weights."""
        dtype = torch.promote_types(self.w_in.weight.dtype, torch.float32)
        return {"w_in": self.w_in.weight.to(dtype).expand(batch_size, -1, -1),
                "w_out": self.w_out.weight.to(dtype).expand(batch_size, -1, -1),
                "grad_in": None, "grad_out": None, "pos": pos}

    def uses_fused_kernel(self):
        return self.is_fast and self.fused_kernel_blocker() is None

    def fused_kernel_blocker(self):
        """None where this fast level runs the fused Triton kernel (kernels/triton_cms.py,
        DESIGN §4 (b)); else why it takes fast_level_scan (the oracle). The kernel covers the
        shapes `fusable_cms` takes in an fp32 model (a bf16 model keeps the torch path,
        whose output is bf16) with backend "triton". It has passed its CUDA tests
        (BENCHMARKS.md), but no GPU run has timed it inside a model, so "auto" does not pick
        it yet. The input's device is not consulted: an explicit "triton" off CUDA (and outside Triton's interpreter) gets the
        kernel's own one-line device error rather than a silent fall-back to the slow path."""
        weight = self.w_in.weight
        if weight.dtype != torch.float32:
            return f"the fused CMS kernel takes an fp32 model, this one is {str(weight.dtype).removeprefix('torch.')}"
        if self.backend != "triton":
            return "the fused CMS kernel runs only with model.kernels=triton until a GPU has timed it in a model"
        from kernels import triton_cms
        hidden, D = weight.shape
        if not triton_cms.fusable_cms(D, hidden, self.chunk_size):
            return (f"the fused CMS kernel does not cover width {D}, hidden {hidden}, chunk "
                    f"{self.chunk_size} (triton_cms.fusable_cms)")
        return None

    def kernel_paths(self, device):
        """{part: None if it runs fused, else why not} (model.kernel_report); {} if static."""
        return {f"CMS fast level (chunk {self.chunk_size})": self.fused_kernel_blocker()} if self.is_fast else {}

    def idle_parameters(self, seq_len):
        """The parameters no gradient reaches in a training sequence of seq_len tokens (from
        position 0): W_v, when the level's first update lands at or past the sequence's end
        (chunk_size >= seq_len), so no token reads an updated weight (LanguageModel.
        idle_parameters)."""
        return [self.w_target.weight] if self.is_fast and self.chunk_size >= seq_len else []

    def flops_per_token(self, backward=True):
        """Estimated FLOPs per token of the fast level's inner loop beyond the model's 6N; 0
        for a static level (a plain FFN, all in 6N). The reads MLP(a_t; theta_c) are in 6N
        already: w_in and w_out are parameters and a read costs the same matmuls as a static
        level's. What 6N does not see, per chunk of C tokens (local_objective_grads, NL
        Eq. 71): the closed-form local gradient, 3 matmuls of 2 C D hidden FLOPs each
        (grad_out, grad_pre, grad_in), and the update theta - lr_l G, 2 FLOPs per entry of
        both weights; amortised over the C tokens. x3 for forward + backward: outer
        gradients flow through every gradient and update (NL §7.1)."""
        if not self.is_fast:
            return 0
        hidden, D = self.w_in.weight.shape
        C = self.chunk_size
        gradient = 3 * 2 * C * D * hidden                                  # per chunk
        update = 2 * 2 * hidden * D                                        # per chunk
        return (FWD_BWD if backward else 1) * (gradient + update) // C

    def forward(self, z, state=None, pos=0):
        """z [B, T, D] -> (MLP output [B, T, D] to add to z, new level state or None)."""
        a = self.norm(z)
        if not self.is_fast:
            return self.w_out(activation_fns(self.activation)[0](self.w_in(a))), None
        B = z.shape[0]
        if state is None:
            state = self.initial_state(B, pos)
        elif state["w_in"].shape[0] != B:
            raise ValueError(f"CMS state holds fast weights for batch size {state['w_in'].shape[0]}, "
                             f"but the input has batch size {B}")
        scan, target = fast_level_scan, self.w_target(a)
        if a.shape[1] and self.uses_fused_kernel():               # one launch for the whole segment
            from kernels import triton_cms
            scan, a, target = triton_cms.fused_fast_level, a.float(), target.float()
        y, w_in, w_out, grad_in, grad_out, pos = scan(
            a, target, state["w_in"], state["w_out"], state["grad_in"], state["grad_out"],
            state["pos"], self.chunk_size, self.inner_lr, self.activation)
        return y, {"w_in": w_in, "w_out": w_out, "grad_in": grad_in, "grad_out": grad_out, "pos": pos}


class ContinuumMemory(nn.Module):
    """The CMS chain as a block's channel mixer: forward(h, state=None, pos=0) -> (y, new_state).

    Reads cfg.cms (the levels, see CMSConfig), cfg.d_model, cfg.norm_eps, cfg.ffn_multiple_of
    (the levels' hidden width, model.hidden_width) and cfg.kernels (the fast levels' backend).
    model.make_block puts it in place of the FFN in HOPE and HOPE-attention blocks while
    model.hope.cms is on (else they keep the SwiGLU FFN); Titans and Transformer++ blocks
    always have the FFN.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cms = cfg.cms
        if cms.activation not in ACTIVATIONS:
            raise ValueError(f"model.cms.activation={cms.activation!r} is not one of: {', '.join(ACTIVATIONS)}")
        hidden = hidden_width(cfg, cms.hidden_mult)
        self.levels = nn.ModuleList([
            CMSLevel(cfg.d_model, hidden, chunk, lr, cms.activation, cfg.norm_eps, backend=cfg.kernels)
            for chunk, lr in zip(cms.chunk_sizes, cms.level_lrs())])

    def memory_flops_per_token(self, seq_len=0, backward=True):
        """Estimated training FLOPs per token of the fast levels' inner loops (the local
        gradients and updates, `CMSLevel.flops_per_token`), which the model's 6N does not
        see; 0 when every level is static. Chunks are amortised, so seq_len is not read: it
        is there so that `LanguageModel.memory_flops_per_token` asks a block's CMS the same
        way as its sequence mixer."""
        return sum(level.flops_per_token(backward) for level in self.levels)

    def forward(self, h, state=None, pos=0):
        """h [B, T, D] (already normed by the block) -> (z_k - h [B, T, D], new state). `pos`
        is the first token's absolute position, read only without a state (a fresh one's
        chunks align to absolute positions); a state carries its own."""
        if h.dim() != 3:
            raise ValueError(f"ContinuumMemory expects [B, T, D] inputs, got shape {tuple(h.shape)}")
        level_states = [None] * len(self.levels) if state is None else state["levels"]
        if len(level_states) != len(self.levels):
            raise ValueError(f"CMS state has {len(level_states)} levels, the module has {len(self.levels)}")
        # Sum the level outputs apart from the stream: z_k - h computed as a difference would
        # lose the small outputs to rounding in bf16.
        z, out, new_states = h, None, []
        for level, level_state in zip(self.levels, level_states):
            y, level_state = level(z, level_state, pos)
            z = z + y                                              # NL Eq. 70: the next level reads this one
            out = y if out is None else out + y
            new_states.append(level_state)
        return out, {"levels": new_states}
