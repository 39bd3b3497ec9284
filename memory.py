"""The neural memory layer shared by Titans and HOPE (DESIGN §3.3).

A memory M maps a head-dim vector to a head-dim vector, per (sequence, head):

    depth 1 (linear):        M(x) = W x
    depth 2 (residual MLP):  M(x) = x + W_out s(W_in x)      W_in [E, d], W_out [d, E], s = SiLU/GELU

(the paper writes the MLP as x + W1 s(W2 x): W_in = W2 is applied first, W_out = W1 second).
Its weights are *fast weights*: per sequence, shape [B, H, out, in], initialised from
outer-learned ("meta") parameters [H, out, in] and trained inside the forward pass on the
inner loss l_t = ||M(k_t) - v_t||^2 (Titans Eq. 12; NL Eq. 85). The inner optimisation is
chunked (Titans §3.2 / TTT mini-batch GD / NL Eq. 90): absolute positions are cut into
chunks of C tokens, and for each token t of the chunk that starts at B(t) = C*floor(t/C):

  1. write, in closed form at the chunk-start weights W_B (no autograd):
        z = W_in,B k,  h = s(z),  pred = k + W_out,B h,  e = 2 (pred - v) = dl/dpred
        layer W_out: input a_t = h,  gradient g_t = e
        layer W_in:  input a_t = k,  gradient g_t = (W_out,B^T e) * s'(z)
     (linear memory: one layer, input k, g_t = 2 (W_B k - v)), so dl_t/dW = g_t a_t^T.
  2. transition, per token, each layer a scan over the chunk (`kernels`, DESIGN §3.2):
        "momentum"  GD with momentum (Titans Eq. 13-14):
                    Z_t = beta_t Z_{t-1} - lr_t g_t a_t^T ;  W_t = alpha_t W_{t-1} + Z_t
                    = kernels.momentum_rule with writes u_t = -lr_t g_t, alpha = 1 - forget
        "dgd"       delta gradient descent (NL Eq. 57/88, exact proximal step):
                    W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) - eta'_t g_t a_t^T,
                    eta'_t = lr_t / (1 + lr_t ||a_t||^2)  (each layer with its own input a_t)
                    = kernels.delta_rule with writes u_t = -eta'_t g_t
        "gd"        plain GD with retention: W_t = alpha_t W_{t-1} - lr_t g_t a_t^T
                    = kernels.delta_rule with eta = 0
  3. readout after the write, per token: y_t = M_t(q_t), layer by layer from the scans'
     outputs (the W_in scan reads q_t, the W_out scan reads s(W_in,t q_t); then + q_t).
The scans' final states are the next chunk's W_B. With C = 1 this is the online learner
that reads after its write (Titans' convention; NL's HOPE equations read before it:
docs/FIDELITY.md HOPE choice 7); a larger C only moves the point where gradients are
taken. Outer gradients flow through everything: writes, gates, targets and the
meta-learned initial weights.

API (all tensors per head; q, k, v [B, T, H, d]; gates lr, alpha, beta [B, T, H]):

    mem = NeuralMemory(n_head, head_dim, depth=2, expansion=2, activation="silu",
                       chunk_size=16, update_rule="momentum")
    y, state = mem(q, k, v, lr, alpha, beta, state=None)       # beta only for "momentum"
    out = mem.scan(q, k, v, lr, alpha, beta, state)            # out.y, out.state
    mem.scan(..., self_target=True)     # target M_B(t)(v_t) instead of v_t (NL Eq. 87, HOPE)

State (a dict; `mem.initial_state(B)` builds a fresh one from the meta parameters):
    "weights"      list per layer [B, H, out, in]: the current fast weights W_t
    "chunk_start"  list per layer: W_B of the chunk the next token belongs to
    "momenta"      list per layer: Z_t ("momentum" rule), else None
    "pos"          int, the absolute position of the next token (`initial_state(B, pos)`
                   starts a fresh memory there); chunks are aligned to multiples of C from 0
Because a token's write depends only on W_B and its own inputs, the state after any
prefix is exact (mid-chunk included): feeding a sequence in one call or in any segments,
down to single tokens, gives the same outputs and final state (no buffering needed).

Building blocks for layers that interleave several memories (HOPE: k_t = M_k,B(x_t) is
read at the chunk-start weights before any memory is updated, with different chunk sizes):
    chunk_pieces(pos, T, *chunk_sizes)   split [0, T) at absolute chunk boundaries
    tokens_to_boundary(pos, C)           tokens from pos to the next chunk boundary
    mem.read(state["chunk_start"], x)    M_B(x) with given per-sequence weights
    mem.scan(..., self_target=True)      writes toward the memory's own targets M_B(v_t)
(scan consumes each chunk piece with `update_piece`), and a gate transform for long
sequences (Titans' `model.titans.step_budget`):
    chunk_step_budget(k, lr, 1 - beta, spent, pos, C, budget)   cap each chunk's summed step per key
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

UPDATE_RULES = ("momentum", "dgd", "gd")
FWD_BWD = 3          # FLOPs of forward + backward over the forward's (the backward costs about two)
ACTIVATIONS = ("silu", "gelu")


def chunk_pieces(pos: int, T: int, *chunk_sizes: int) -> list[tuple[int, int]]:
    """Split the token range [0, T) that starts at absolute position `pos` into pieces
    that never cross a multiple of any of `chunk_sizes` (absolute chunk boundaries).
    Returns (lo, hi) offsets relative to the start, covering [0, T) in order."""
    if T < 0 or pos < 0:
        raise ValueError(f"pos and T must be >= 0; got pos={pos}, T={T}")
    for c in chunk_sizes:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"chunk sizes must be integers >= 1; got {c!r}")
    cuts = {0, T}
    for c in chunk_sizes:
        cuts.update(range(tokens_to_boundary(pos, c), T, c))
    cuts = sorted(x for x in cuts if 0 <= x <= T)
    return list(zip(cuts[:-1], cuts[1:]))


def tokens_to_boundary(pos: int, chunk_size: int) -> int:
    """The number of tokens from absolute position `pos` to the next multiple of
    `chunk_size` (0 when pos is one): the offset of the first chunk boundary at or after pos."""
    return (chunk_size - pos % chunk_size) % chunk_size


def activation_fns(name):
    """s and s' (closed-form derivative, for the inner gradients without autograd) of the
    memories' and the CMS levels' MLPs: SiLU or exact (erf) GELU."""
    if name == "silu":
        def deriv(z):
            sig = torch.sigmoid(z)
            return sig * (1 + z * (1 - sig))
        return F.silu, deriv
    if name == "gelu":                            # exact (erf) GELU
        def deriv(z):
            return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return F.gelu, deriv
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def delta_step_sizes(update_rule, lr, a):
    """(erase, write) step sizes of the "dgd" and "gd" transitions
    W_t = W_{t-1} (alpha_t I - erase_t a_t a_t^T) - write_t g_t a_t^T (kernels.delta_rule):
    DGD's exact proximal step eta'_t = lr_t / (1 + lr_t ||a_t||^2) for both (NL Eq. 57);
    GD erases nothing and writes with lr_t. lr [B, T, H], a [B, T, H, K] the layer's inputs."""
    if update_rule == "dgd":
        eta = lr / (1 + lr * a.pow(2).sum(-1))                 # eta' (NL Eq. 57)
        return eta, eta
    return torch.zeros_like(lr), lr


class MemoryOutput(NamedTuple):
    y: torch.Tensor          # [B, T, H, d] readouts after the write, M_t(q_t)
    state: dict              # the state after the last token


class NeuralMemory(nn.Module):
    """Per-head fast-weight memory trained in-context by chunked inner GD (module doc).

    n_head, head_dim   H memories of width d (queries, keys, values are [B, T, H, d])
    depth              1 = linear W x; 2 = residual MLP x + W_out s(W_in x)
    expansion          hidden width E = expansion * head_dim (depth 2)
    chunk_size         C, gradients at the chunk-start weights
    update_rule        "momentum" (Titans) | "dgd" (HOPE) | "gd"
    max_grad_norm      None = off (the paper's update); tau > 0: each token's inner gradient
                       (all layers together, Frobenius norm) is rescaled to norm <= tau
                       before the transition: g_t <- g_t * tau / max(tau, ||dl_t/dW||).
                       Bounds every write, so a deep memory whose inner GD turns unstable
                       grows linearly instead of exponentially (our choice, docs/FIDELITY.md)
    detach_targets     stop outer gradients through the targets v in the inner loss
    detach_chunks_older_than   n > 0: truncated backprop through the inner loop: the fast
                       weights (and momenta) are detached at every absolute chunk boundary
                       that is a multiple of n chunks, so outer gradients reach back at
                       most n chunks (forward values are unchanged); 0 = full backprop
    backend            kernels backend ("auto" | "reference" | "torch" | "triton"); where the
                       scans run in Triton ("triton", or "auto" on CUDA) a linear memory runs
                       as one fused kernel per layer (kernels/triton_memory.py); the MLP
                       memory's kernel (triton_mlp_memory.py) runs only with backend
                       "triton", not yet with "auto" (`fused_kernel_blocker`). On the
                       per-chunk path a layer whose key dim (d, or an MLP's hidden width E)
                       exceeds kernels.checks.MAX_KEY_DIM scans in PyTorch ("torch") under
                       "triton" as under "auto" (`_scan_backend`)
    """

    def __init__(self, n_head: int, head_dim: int, depth: int = 2, expansion: int = 2,
                 activation: str = "silu", chunk_size: int = 16, update_rule: str = "momentum",
                 max_grad_norm: Optional[float] = None, detach_targets: bool = False,
                 detach_chunks_older_than: int = 0, backend: str = "auto"):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"memory depth must be 1 (linear) or 2 (residual MLP); got {depth}")
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {update_rule!r}")
        for name, value, low in (("n_head", n_head, 1), ("head_dim", head_dim, 1),
                                 ("expansion", expansion, 1), ("chunk_size", chunk_size, 1),
                                 ("detach_chunks_older_than", detach_chunks_older_than, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"memory {name} must be an integer >= {low}; got {value!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"memory max_grad_norm must be > 0 or None; got {max_grad_norm!r}")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"memory backend must be one of {', '.join(kernels.BACKENDS)}; got {backend!r}")
        self.n_head, self.head_dim, self.depth = n_head, head_dim, depth
        self.hidden_dim = expansion * head_dim
        self.activation = activation
        self.act, self.act_deriv = activation_fns(activation)
        self.chunk_size, self.update_rule, self.backend = chunk_size, update_rule, backend
        self.max_grad_norm, self.detach_targets = max_grad_norm, detach_targets
        self.detach_chunks_older_than = detach_chunks_older_than
        # Meta-learned initial fast weights, in application order: [W] or [W_in, W_out].
        shapes = [(head_dim, head_dim)] if depth == 1 else [(self.hidden_dim, head_dim),
                                                            (head_dim, self.hidden_dim)]
        self.init_weights = nn.ParameterList([nn.Parameter(torch.empty(n_head, o, i)) for o, i in shapes])
        self.reset_memory_parameters()

    def reset_memory_parameters(self):
        # N(0, 1/fan_in): the memory's layers start as variance-preserving random maps
        # (Titans does not state an init; the outer optimiser learns it, DESIGN §3.3).
        for w in self.init_weights:
            nn.init.normal_(w, mean=0.0, std=w.shape[-1] ** -0.5)

    def extra_repr(self):
        return (f"n_head={self.n_head}, head_dim={self.head_dim}, depth={self.depth}, "
                f"hidden={self.hidden_dim if self.depth == 2 else '-'}, chunk_size={self.chunk_size}, "
                f"update_rule={self.update_rule}, max_grad_norm={self.max_grad_norm}")

    # ------------------------------------------------------------------------------------
    # state

    def _dtype(self):
        return torch.promote_types(self.init_weights[0].dtype, torch.float32)

    def initial_state(self, batch_size: int, pos: int = 0) -> dict:
        """Fresh per-sequence state: every sequence's fast weights = the meta parameters, the
        first token at absolute position `pos` (chunks align to absolute positions)."""
        dtype = self._dtype()
        weights = [w.to(dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in self.init_weights]
        momenta = None
        if self.update_rule == "momentum":
            momenta = [w.new_zeros(w.shape) for w in weights]
        return {"weights": weights, "chunk_start": list(weights), "momenta": momenta, "pos": pos}

    def _state_for(self, batch_size: int, state: Optional[dict]) -> dict:
        """`state`, or a fresh one at position 0; a state made for another batch size is a
        one-line error (the einsums and scans would name only a mismatched dimension)."""
        if state is None:
            return self.initial_state(batch_size)
        held = state["weights"][0].shape[0]
        if held != batch_size:
            raise ValueError(f"memory state holds fast weights for batch size {held}, but the "
                             f"input has batch size {batch_size}")
        return state

    # ------------------------------------------------------------------------------------
    # the memory as a function of given weights

    def read(self, weights, x):
        """M(x) with per-sequence weights (a list per layer, [B, H, out, in]); x [B, T, H, d]."""
        dtype = self._dtype()
        with _no_autocast(x):
            x = x.to(dtype)
            if self.depth == 1:
                return torch.einsum("bhoi,bthi->btho", weights[0], x)
            hidden = self.act(torch.einsum("bhoi,bthi->btho", weights[0], x))
            return x + torch.einsum("bhoi,bthi->btho", weights[1], hidden)

    def _inputs_and_gradients(self, weights, k, v):
        """Per layer, the input a_t and the gradient g_t = dl_t/d(W a_t) of the inner loss
        l_t = ||M(k_t) - v_t||^2 at `weights` (the chunk-start W_B), in closed form."""
        if self.depth == 1:
            error = 2 * (torch.einsum("bhoi,bthi->btho", weights[0], k) - v)
            return [k], [error]
        w_in, w_out = weights
        pre = torch.einsum("bhoi,bthi->btho", w_in, k)                   # z = W_in k
        hidden = self.act(pre)                                            # h = s(z)
        error = 2 * (k + torch.einsum("bhoi,bthi->btho", w_out, hidden) - v)    # dl/dpred
        grad_pre = torch.einsum("bhoi,btho->bthi", w_out, error) * self.act_deriv(pre)
        return [k, hidden], [grad_pre, error]

    # ------------------------------------------------------------------------------------
    # the inner optimisation

    def update_piece(self, q, k, target, lr, alpha, beta=None, state=None, readout=True):
        """Consume L tokens that lie inside one chunk (pos % C + L <= C): writes at the
        chunk-start weights toward `target` (the inner loss ||M(k_t) - target_t||^2: v_t, or
        M_B(v_t) for scan's self_target), per-token transitions, readout after the write.
        Returns (y [B, L, H, d], new state); y is None with readout=False (the scans then
        skip their readouts: HOPE's projection memories keep only their states)."""
        B, L = q.shape[:2]
        state = self._state_for(B, state)
        C, pos = self.chunk_size, state["pos"]
        if pos % C + L > C:
            raise ValueError(f"update_piece got {L} tokens at position {pos}, crossing the "
                             f"chunk boundary at {pos + C - pos % C} (chunk_size={C}); use chunk_pieces")
        dtype = self._dtype()
        if L == 0:
            return (q.new_zeros(q.shape, dtype=dtype) if readout else None), state
        with _no_autocast(q):
            q, k, target, lr, alpha = (t.to(dtype) for t in (q, k, target, lr, alpha))
            beta = beta.to(dtype) if beta is not None else None
            if self.detach_targets:
                target = target.detach()
            inputs, grads = self._inputs_and_gradients(state["chunk_start"], k, target)
            if self.max_grad_norm is not None:        # ||g a^T||_F = ||g|| ||a||, summed over layers
                squared = sum(g.pow(2).sum(-1) * a.pow(2).sum(-1) for a, g in zip(inputs, grads))
                # tau / max(tau, norm), clamped before the root: sqrt's backward at a zero
                # gradient (an underflowed SiLU) would be 0 / 0 = NaN
                scale = self.max_grad_norm * squared.clamp(min=self.max_grad_norm ** 2).rsqrt()
                grads = [g * scale.unsqueeze(-1) for g in grads]
            new_weights, new_momenta = [], ([] if self.update_rule == "momentum" else None)
            query = q
            for layer, (a, g) in enumerate(zip(inputs, grads)):
                W, backend = state["weights"][layer], self._scan_backend(a.shape[-1])
                if not readout:                 # nothing is read: the keys stand in (shapes match)
                    query = a
                if self.update_rule == "momentum":
                    out, W, Z = kernels.momentum_rule(
                        query, a, -lr.unsqueeze(-1) * g, alpha, beta, W, state["momenta"][layer],
                        chunk_size=C, backend=backend, output=readout)
                    new_momenta.append(Z)
                else:                                                      # "dgd" | "gd"
                    erase, write = delta_step_sizes(self.update_rule, lr, a)
                    out, W = kernels.delta_rule(query, a, -write.unsqueeze(-1) * g, alpha, erase, W,
                                                chunk_size=C, backend=backend, output=readout)
                new_weights.append(W)
                if layer + 1 < len(inputs) and readout:
                    query = self.act(out)                  # W_out reads s(W_in,t q_t)
            y = (out + q if self.depth == 2 else out) if readout else None
        new_pos = pos + L
        chunk_start = state["chunk_start"]
        if new_pos % C == 0:                     # the chunk is complete: new W_B
            n = self.detach_chunks_older_than
            if n and (new_pos // C) % n == 0:
                new_weights = [w.detach() for w in new_weights]
                new_momenta = None if new_momenta is None else [z.detach() for z in new_momenta]
            chunk_start = new_weights
        return y, {"weights": new_weights, "chunk_start": list(chunk_start),
                   "momenta": new_momenta, "pos": new_pos}

    def _scan_backend(self, key_dim) -> str:
        """The scan backend of one layer on the per-chunk path: the memory's, except that
        under "triton" a layer whose key dim (its input width: d, or the hidden width E of an
        MLP's second layer) exceeds kernels.checks.MAX_KEY_DIM, which the Triton scans do not
        hold, takes the chunked PyTorch scan, as "auto" does (kernels.select_backend)."""
        if self.backend == "triton" and key_dim > kernels.checks.MAX_KEY_DIM:
            return "torch"
        return self.backend

    def scan(self, q, k, v, lr, alpha, beta=None, state=None, self_target=False, readout=True) -> MemoryOutput:
        """Run the chunked inner optimisation over T tokens (any T, any starting position).
        `self_target`: the memory generates its own target (NL Eq. 87): token t learns
        l_t = ||M(k_t) - M_B(t)(v_t)||^2, its value read at the chunk-start weights of its
        chunk, before the chunk's writes (HOPE's memories; outer gradients flow through the
        read unless detach_targets). Returns MemoryOutput(y, state); readout=False: y is None
        where the per-chunk path runs (it skips the readouts), the fused layer computes it."""
        self._check_inputs(q, k, v, lr, alpha, beta)
        if not isinstance(self_target, bool):
            raise ValueError(f"memory self_target must be a bool; got {self_target!r}")
        B, T = q.shape[:2]
        state = self._state_for(B, state)
        if T > 0 and self._use_fused_kernel(q, self_target):
            return self._fused_scan(q, k, v, lr, alpha, beta, state, self_target)
        return self._scan_pieces(q, k, v, lr, alpha, beta, state, self_target, readout)

    def _scan_pieces(self, q, k, v, lr, alpha, beta, state, self_target, readout=True) -> MemoryOutput:
        """scan() chunk piece by chunk piece with update_piece (the per-chunk path, the oracle)."""
        ys = []
        for lo, hi in chunk_pieces(state["pos"], q.shape[1], self.chunk_size):
            target = self.read(state["chunk_start"], v[:, lo:hi]) if self_target else v[:, lo:hi]
            y, state = self.update_piece(q[:, lo:hi], k[:, lo:hi], target, lr[:, lo:hi],
                                         alpha[:, lo:hi], None if beta is None else beta[:, lo:hi],
                                         state, readout)
            ys.append(y)
        if not readout:
            return MemoryOutput(None, state)
        y = torch.cat(ys, 1) if ys else q.new_zeros(q.shape, dtype=self._dtype())
        return MemoryOutput(y, state)

    def _use_fused_kernel(self, q, self_target=False) -> bool:
        """scan() takes one fused Triton launch where `fused_kernel_blocker` finds nothing
        in the way."""
        return self.fused_kernel_blocker(q.device, self_target) is None

    def fused_kernel_blocker(self, device, self_target=False) -> Optional[str]:
        """None where scan() on `device` runs the fused Triton layer; else why it takes the
        per-chunk path above (the oracle, and the CPU path). The fused layer needs the scans
        in Triton (backend "triton", or "auto" on CUDA), fp32 state, full backprop, and a
        linear memory with C <= triton_memory.max_chunk(d) (64, or 32 above d 64), d <= 128 and
        no clipping (kernels/triton_memory.py) or an
        MLP memory that `fusable_mlp` takes, clipped or not (kernels/triton_mlp_memory.py).
        The MLP kernel has passed its CUDA tests at the paper shapes, but no GPU run has yet
        timed it inside a model (BENCHMARKS.md), so only an explicit backend "triton" selects
        it; "auto" keeps the per-chunk path for MLP memories.
        Self-generated targets (scan's self_target) are for the MLP kernel's DGD/GD rules
        only, and not with detach_targets (the in-kernel target would still pass gradients to
        W_B). train.py prints these reasons per model part at start-up
        (model.LanguageModel.kernel_report). A reason for the per-chunk path also says which
        layers scan in PyTorch there though the scans are Triton's (`_scan_backend`)."""
        why = self._fused_blocker(device, self_target)
        wide = [w for w in self._layer_key_dims()
                if w > kernels.checks.MAX_KEY_DIM] if why is not None else []
        if wide and kernels.select_backend(self.backend, device, self._dtype()) == "triton":
            why += (f"; its layers of key dim {', '.join(map(str, wide))} (above "
                    f"{kernels.checks.MAX_KEY_DIM}) scan in PyTorch")
        return why

    def _layer_key_dims(self) -> list[int]:
        """Each layer's key dim on the per-chunk path (its input width): d, and the hidden
        width E of an MLP's second layer."""
        return [self.head_dim] if self.depth == 1 else [self.head_dim, self.hidden_dim]

    def _fused_blocker(self, device, self_target) -> Optional[str]:
        """fused_kernel_blocker's reason, before the note on wide layers."""
        if self.detach_chunks_older_than:
            return "truncated backprop (detach_chunks_older_than) runs per chunk"
        if self._dtype() != torch.float32:
            return f"the fused kernels hold fp32 fast weights, these are {str(self._dtype()).removeprefix('torch.')}"
        if self.depth == 1 and self.max_grad_norm is not None:
            return "the fused linear kernel does not clip (max_grad_norm)"
        if self_target and (self.depth == 1 or self.update_rule == "momentum" or self.detach_targets):
            return "self-generated targets are fused for MLP memories with DGD / GD, without detach_targets"
        if kernels.select_backend(self.backend, device, self._dtype()) != "triton":
            return f"backend {self.backend!r} on {torch.device(device).type} runs the chunked PyTorch path"
        if self.depth == 2:
            if self.backend != "triton":                 # opt-in until a GPU has timed it in a model
                return "the fused MLP memory kernel runs only with model.kernels=triton until a GPU has timed it in a model"
            from kernels import triton_mlp_memory
            E = self.hidden_dim
            if not triton_mlp_memory.fusable_mlp(self.head_dim, E // self.head_dim, self.chunk_size,
                                                 self.update_rule):
                return (f"the fused MLP memory kernel does not cover d={self.head_dim}, hidden {E}, "
                        f"chunk {self.chunk_size}, rule {self.update_rule} (triton_mlp_memory.fusable_mlp)")
            return None
        from kernels import triton_memory
        if not triton_memory.fusable(self.head_dim, self.chunk_size):
            return (f"the fused linear memory kernel does not cover d={self.head_dim}, chunk "
                    f"{self.chunk_size} (triton_memory.fusable)")
        return None

    def _fused_scan(self, q, k, v, lr, alpha, beta, state, self_target=False) -> MemoryOutput:
        """scan() through the fused kernel: a chunk begun in an earlier call is finished by
        the per-chunk path, then every remaining chunk (aligned to t = 0 of the rest) in one
        launch."""
        from kernels import triton_memory, triton_mlp_memory
        C, ys = self.chunk_size, []
        head = min(tokens_to_boundary(state["pos"], C), q.shape[1])
        if head:
            y, state = self._scan_pieces(q[:, :head], k[:, :head], v[:, :head], lr[:, :head],
                                         alpha[:, :head], None if beta is None else beta[:, :head],
                                         state, self_target)
            ys.append(y)
            q, k, v, lr, alpha = (t[:, head:] for t in (q, k, v, lr, alpha))
            beta = None if beta is None else beta[:, head:]
        if q.shape[1]:
            with _no_autocast(q):
                q, k, v, lr, alpha = (t.float() for t in (q, k, v, lr, alpha))
                v = v.detach() if self.detach_targets else v
                momenta = None
                if self.depth == 2 and self.update_rule == "momentum":
                    y, weights, momenta, start = triton_mlp_memory.fused_mlp_memory_momentum(
                        q, k, v, alpha, beta.float(), lr, *state["weights"], *state["momenta"], C,
                        activation=self.activation, max_grad_norm=self.max_grad_norm)
                    momenta = list(momenta)
                elif self.depth == 2:
                    y, weights, start = triton_mlp_memory.fused_mlp_memory_delta(
                        q, k, v, alpha, lr, *state["weights"], C, dgd=self.update_rule == "dgd",
                        activation=self.activation, max_grad_norm=self.max_grad_norm,
                        self_target=self_target)
                elif self.update_rule == "momentum":               # linear: one layer, input k
                    y, w, z, w_start = triton_memory.fused_linear_memory_momentum(
                        q, k, v, alpha, beta.float(), lr, state["weights"][0], state["momenta"][0], C)
                    weights, start, momenta = [w], [w_start], [z]
                else:
                    erase, write = delta_step_sizes(self.update_rule, lr, k)
                    y, w, w_start = triton_memory.fused_linear_memory_delta(
                        q, k, v, alpha, erase, write, state["weights"][0], C)
                    weights, start = [w], [w_start]
            ys.append(y)
            state = self.state_after_launch(weights, start, momenta, state["pos"] + q.shape[1])
        return MemoryOutput(torch.cat(ys, 1), state)

    def state_after_launch(self, weights, start, momenta, pos):
        """The state a fused kernel leaves at position pos: its final weights (and momenta),
        and the chunk-start weights, which are the final ones on a chunk boundary and else
        the kernel's W_B (the last chunk's start)."""
        return {"weights": list(weights), "chunk_start": list(weights if pos % self.chunk_size == 0 else start),
                "momenta": momenta, "pos": pos}

    def forward(self, q, k, v, lr, alpha, beta=None, state=None, self_target=False):
        """(y [B, T, H, d], state): readouts after the write, M_t(q_t) (self_target: scan)."""
        out = self.scan(q, k, v, lr, alpha, beta, state, self_target=self_target)
        return out.y, out.state

    def _check_inputs(self, q, k, v, lr, alpha, beta):
        shape = (self.n_head, self.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[2:]) != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"memory {name} must be [B, T, {shape[0]}, {shape[1]}]; got {got}")
            if t.shape[:2] != q.shape[:2]:
                raise ValueError(f"memory {name} must have q's batch and length {list(q.shape[:2])}; got {list(t.shape[:2])}")
        gates = {"lr": lr, "alpha": alpha}
        if self.update_rule == "momentum":
            if beta is None:
                raise ValueError("memory update_rule='momentum' needs the momentum gate beta")
            gates["beta"] = beta
        elif beta is not None:
            raise ValueError(f"memory update_rule={self.update_rule!r} takes no momentum gate beta")
        for name, g in gates.items():
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(q.shape[:3]):
                got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"memory gate {name} must be [B, T, H] = {list(q.shape[:3])}; got {got}")

    def read_flops(self) -> int:
        """Forward FLOPs of one read M(x) (`read`) per token and head: W x, or the MLP's two
        matmuls."""
        return 2 * 2 * self.head_dim * self.hidden_dim if self.depth == 2 else 2 * self.head_dim ** 2

    def flops_per_token(self, backward: bool = True) -> int:
        """Estimated FLOPs per token of the inner loop (all heads): closed-form writes at
        W_B, plus per layer (V x K) the chunked scan's work per token (kernels/chunked.py:
        intra-chunk C x C products, state reads and writes). x3 for forward + backward."""
        d, E, C = self.head_dim, self.hidden_dim, self.chunk_size
        layers = [(d, d)] if self.depth == 1 else [(E, d), (d, E)]
        writes = 2 * d * d if self.depth == 1 else 3 * 2 * d * E            # z, pred, W_out^T e
        scans = 0
        for V, K in layers:
            # 2C(K + V): the intra-chunk Q K^T and its product with the writes; 2C^2: the C x C
            # gate products (A @ B); 8 V K: four products per token with a V x K-sized state at
            # 2 FLOPs per multiply-add, two reading the states a chunk starts from (momentum:
            # Q S_0^T, Q Z_0^T; delta: Q S_0^T, W S_0^T) and two building the chunk-end states
            # (momentum: the writes to S and Z; delta: U'^T K_d and W^T K_d)
            scans += 2 * C * (K + V) + 2 * C * C + 8 * V * K
        per_head = writes + scans
        return (FWD_BWD if backward else 1) * self.n_head * per_head


def chunk_step_budget(k, lr, keep, spent, pos: int, chunk_size: int, budget: float,
                      backend: str = "torch"):
    """Cap each token's inner learning rate by the step its chunk has left along its key
    (our stabiliser for long sequences, `model.titans.step_budget`; docs/FIDELITY.md, Titans
    choice 14).

    Every write of a chunk is formed at the chunk-start weights W_B, so a key direction that
    recurs in the chunk is corrected once per occurrence against the same stale error. The
    inner loss ||M(k) - v||^2 has curvature 2 along a unit key: a step e along k scales the
    error by (1 - 2e), so e = 0.5 solves it exactly and e >= 1 overshoots and grows. A chunk
    of redundant keys (at 64 tokens: bytes, or the smooth output of an attention layer) adds
    up to many such steps, and the chunk-to-chunk map then expands: outer gradients grow
    exponentially with the sequence length. Token t's step is e_t = lr_t / keep_t (keep =
    1 - beta: momentum repeats a write 1 / (1 - beta) times); P = sum e_s k_s k_s^T over the
    earlier tokens of its chunk is what the chunk has spent, k_t^T P k_t of it along k_t:

        e_t = min(lr_t / keep_t, max(0, budget - k_t^T P k_t)),   lr'_t = keep_t e_t,
        P <- P + e_t k_t k_t^T                      (P = 0 at every chunk start)

    So a chunk steps at most `budget` along each of its keys: one key repeated through the
    chunk writes like a single token; orthogonal keys keep their own lr. Causal: lr'_t
    depends on token t and the earlier tokens of its chunk only.

    k [B, T, H, d] unit-norm keys; lr, keep [B, T, H]; `spent` [B, H, d, d] is P of the chunk
    that position `pos` lies in (None = nothing spent yet). Returns (lr' [B, T, H], P after
    the last token, None on a chunk boundary). `backend` "triton" (the memory's, resolved:
    kernels.select_backend) runs the loop over each chunk's tokens as one Triton kernel,
    forward and backward (kernels/triton_budget.py), for fp32 keys and chunks of at most
    kernels.checks.MAX_BUDGET_CHUNK tokens; otherwise it is the PyTorch loop below, the reference."""
    if k.shape[1] == 0:
        return lr, spent
    with _no_autocast(k):          # fp32 like the memory itself (a bf16 overlap would round the caps)
        return _chunk_step_budget(k, lr, keep, spent, pos, chunk_size, budget, backend)


def budget_kernel_blocker(backend: str, device, chunk_size: int, dtype=torch.float32) -> Optional[str]:
    """None where chunk_step_budget runs its Triton kernel for `backend` on `device` (fp32
    keys, chunks of at most kernels.checks.MAX_BUDGET_CHUNK); else why it takes the PyTorch
    loop over each chunk's tokens (model.LanguageModel.kernel_report prints it)."""
    if kernels.select_backend(backend, device, dtype) != "triton":
        return f"backend {backend!r} on {torch.device(device).type} runs the PyTorch loop"
    if dtype != torch.float32:
        return f"the step-budget kernel takes fp32 keys, these are {str(dtype).removeprefix('torch.')}"
    if chunk_size > kernels.checks.MAX_BUDGET_CHUNK:
        return (f"the step-budget kernel holds chunks of at most {kernels.checks.MAX_BUDGET_CHUNK} tokens, "
                f"not {chunk_size}")
    return None


def _chunk_step_budget(k, lr, keep, spent, pos, chunk_size, budget, backend):
    B, T, H, d = k.shape
    C, head = chunk_size, pos % chunk_size
    n = -(-(head + T) // C)
    tail = n * C - head - T

    def chunked(x, fill=0.0):              # [B, T, ...] -> [B, n, C, ...], aligned to chunks
        pad = [0, 0] * (x.dim() - 2) + [head, tail]
        return F.pad(x, pad, value=fill).view(B, n, C, *x.shape[2:])

    kc, lrc = chunked(k), chunked(lr)                                   # padding: lr 0, keep 1
    keepc = chunked(keep.clamp(min=1e-6), fill=1.0)   # > 0: 1 - sigmoid rounds to 0 at large logits
    overlap = torch.einsum("bnihd,bnjhd->bnhij", kc, kc).pow(2)        # (k_i . k_j)^2
    used = lrc.new_zeros(B, n, H, C)                                   # k_j^T P k_j, j in the chunk
    if spent is not None:
        first = torch.einsum("bchi,bhij,bchj->bhc", kc[:, 0], spent, kc[:, 0])
        used = torch.cat([first.unsqueeze(1), used[:, 1:]], 1)
    wanted = lrc / keepc                                                # the uncapped steps
    if budget_kernel_blocker(backend, k.device, C, k.dtype) is None:
        from kernels.triton_budget import capped_steps
        e = capped_steps(wanted.transpose(2, 3), used, overlap, budget).transpose(2, 3)
    else:
        steps = []
        for j in range(C):
            e = torch.minimum(wanted[:, :, j], F.relu(budget - used[..., j]))
            used = used + e.unsqueeze(-1) * overlap[..., j]
            steps.append(e)
        e = torch.stack(steps, 2)                                       # [B, n, C, H]
    new_lr = (e * keepc).reshape(B, n * C, H)[:, head:head + T]
    if (pos + T) % C == 0:
        return new_lr, None
    last = torch.einsum("bch,bchi,bchj->bhij", e[:, -1], kc[:, -1], kc[:, -1])
    return new_lr, last if (n > 1 or spent is None) else spent + last


def _no_autocast(like):
    """Fast-weight math runs in float32 (at least) even under bf16 autocast: the inner
    loop accumulates many small writes into the same weights. A plain torch.autocast
    context: torch.compile traces it (a wrapper calling __enter__ by hand broke every
    Titans/HOPE block into 10-24 graphs and sent the chunk loop back to eager)."""
    return torch.autocast(like.device.type if like.device.type in ("cuda", "cpu") else "cpu", enabled=False)
