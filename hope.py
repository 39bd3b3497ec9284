"""Self-modifying Titans: the sequence mixer of HOPE (NL §8, Eq. 83-97; DESIGN §3.5).

Every projection of a Titans layer is itself a memory that learns in context, and every
memory generates its own training target (NL Eq. 84-88). Per layer, with H heads of width d:

    x~_t  = SiLU(conv4(W_in x_t))           split into heads         (W_in static; NL §8.3)
    k_t   = L2norm(M_k,B(x~_t))                                       (NL Eq. 90, read at the
    v_t   = M_v,B(x~_t)                                                 chunk start B = B(t))
    eta_t = eta_max * sigmoid(w_eta . M_eta,B(x~_t) + b_eta)          one scalar per head
    alpha_t = sigmoid(w_alpha . M_alpha,B(x~_t) + b_alpha)            one scalar per head
    q_t   = L2norm(W_q x_t)                 static ("the only non-adaptive projection", §8.1);
                                            adaptive_q: L2norm(M_q,B(x~_t))
    v^_[]t = M_[],B(v_t)                    each memory's own target (NL Eq. 87)
    l_[]   = ||M_[](k_t) - v^_[]t||^2       learned by DGD with the shared eta_t, alpha_t
                                            (NL Eq. 88/90; the layer update in memory.py)
    o_t   = M_mem,t(q_t)                    readout after the write
    y_t   = W_o (RMSNorm(o_t) * SiLU(W_g x_t))                        (Titans §4.4 output)

Every M_[] is a per-head residual 2-layer MLP x + W1 s(W2 x) (NL Eq. 89/91) whose initial
weights are outer-learned, held as per-sequence fast weights by `memory.NeuralMemory`
(DESIGN §3.3: chunked inner gradients at the chunk-start weights, per-token DGD
transitions W(alpha I - eta' a a^T) on each layer with that layer's input a, readout after
the write). Two chunk sizes (NL §8.2): C_other for the projection memories M_k, M_v, M_eta,
M_alpha (and M_q), C_mem for M_mem.

Order of computation. The projection memories never read M_mem, so a segment runs in two
stages, each exact for any segment boundaries:
  1. the projection memories, chunk piece by chunk piece (C_other): read k, v, eta, alpha
     at the chunk-start weights, then one `scan(..., self_target=True)` of the piece
     generates the targets and writes (one DGD scan per layer, or one fused launch). With
     model.kernels=triton and the default projection set, the stage is one launch per
     segment (kernels/triton_hope.py: the reads and gates in-kernel, with its backward;
     `_projection_stage`), after the pieces that finish a chunk begun in an earlier call;
  2. M_mem over the whole segment in one `NeuralMemory.scan(..., self_target=True)` (chunk
     C_mem) with the keys, values and gates of stage 1: per chunk piece it reads the target
     M_mem,B(v_t) at the chunk-start weights, then writes (or the fused MLP kernel takes
     the whole segment, that target computed in-kernel, where
     memory.NeuralMemory.fused_kernel_blocker allows).
The projection memories share keys, gates and chunk size and differ only in weights and
targets, so they run as ONE NeuralMemory with n_memories * H heads (memory-major: head
m*H + h is memory m's head h): one scan per layer instead of one per memory.

Ablations (NL Table 6; config `model.hope`): inner_opt gd (no k k^T term), retention false
(alpha = 1, no M_alpha), adaptive_k/v false (a static linear W_k x~ / W_v x~ instead of the
memory), adaptive_q, inner_lr_fixed (eta_t = constant, no M_eta; 0 = no writes, though with
retention the data-dependent decay alpha_t still passes context on: docs/FIDELITY.md).

State (`None` = start of a sequence; fast weights are per sequence):
    {"conv": [B, conv_size-1, D] last inputs of the conv (None if conv_size is 0),
     "projections": the stacked projection memories' state (None if there are none),
     "memory": M_mem's state, "pos": tokens consumed}
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from memory import FWD_BWD, NeuralMemory, chunk_pieces, tokens_to_boundary
from model import CausalDepthwiseConv, RMSNorm
from titans import gated_output

# Initialisation (the paper gives none). LanguageModel first draws every Linear from
# N(0, 0.02) (GPT-2) and the memories from N(0, 1/fan_in) (memory.py), then calls
# `reset_memory_parameters`, which rescales the two projections around the memories (W_in,
# W_gate) and draws the eta / alpha gates' weights, N(0, 1/d), and biases (below). With
# N(0, 0.02) for them the tiny HOPE of the in-context recall test (tests/test_hope.py)
# recalled 37 % after 250 steps at seed 0; with these, 37-96 % over seeds 0-5 at 250 steps
# and 64-100 % at 500 (docs/FIDELITY.md, HOPE choice 11: that does not show this init is
# better, only that it trains). They rely on the inner-gradient clip
# (model.hope.max_grad_norm) to keep the larger writes stable:
W_IN_STD = 3.0                 # x 1/sqrt(d_model): x~ = SiLU(conv(W_in x)) has O(1) entries, so the
                               # values v = M_v(x~) are larger than the unit-norm keys and the
                               # errors M_B(k) - M_B(v) of the writes carry the value, not -M_B(k)
GATE_STD = 2.0                 # x 1/sqrt(d_model): SiLU(W_g x) starts as an O(1) gate, not a
                               # near-zero factor that multiplies the readout into silence
ETA_BIAS_INIT = 0.0            # eta_t starts at eta_max * sigmoid(0) = eta_max / 2
ALPHA_BIAS_INIT = 4.0          # alpha_t starts at sigmoid(4) = 0.982: slow forgetting (cf. GDN)


class SelfModifyingTitans(nn.Module):
    """The HOPE sequence mixer (module doc): forward(x, state=None, pos=0) -> (y, state)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hope
        D, H = cfg.d_model, cfg.n_head       # ModelConfig checked that H divides D
        self.n_head, self.head_dim, self.d_model = H, D // H, D
        self.chunk_other, self.chunk_mem = hc.chunk_other, hc.chunk_mem
        self.eta_max, self.inner_lr_fixed = hc.eta_max, hc.inner_lr_fixed
        self.retention = hc.retention
        self.adaptive_k, self.adaptive_v, self.adaptive_q = hc.adaptive_k, hc.adaptive_v, hc.adaptive_q
        rule = hc.inner_opt          # "dgd" | "gd" (memory.py update rules of the same name)

        def memory(n_memories, chunk_size):
            return NeuralMemory(n_memories * H, self.head_dim, depth=2, expansion=hc.memory_expansion,
                                activation=hc.activation, chunk_size=chunk_size, update_rule=rule,
                                max_grad_norm=hc.max_grad_norm, detach_targets=hc.detach_targets,
                                detach_chunks_older_than=hc.detach_chunks_older_than, backend=cfg.kernels)

        self.w_in = nn.Linear(D, D, bias=False)
        self.conv = CausalDepthwiseConv(D, hc.conv_size)    # width 0: identity, 1: a per-channel scale
        # The projection memories present in this configuration, in stacking order.
        names = []
        if self.adaptive_k:
            names.append("k")
        if self.adaptive_v:
            names.append("v")
        if self.adaptive_q:
            names.append("q")
        if self.inner_lr_fixed is None:
            names.append("eta")
        if self.retention:
            names.append("alpha")
        self.projection_names = tuple(names)
        self.projections = memory(len(names), hc.chunk_other) if names else None
        self.memory = memory(1, hc.chunk_mem)                                 # M_mem
        # Static projections (NL Table 6 "w/o inner-projection": moved to the lowest level).
        self.w_k = None if self.adaptive_k else nn.Linear(D, D, bias=False)
        self.w_v = None if self.adaptive_v else nn.Linear(D, D, bias=False)
        self.w_q = None if self.adaptive_q else nn.Linear(D, D, bias=False)
        # Scalar gates per head from the d-dim outputs of M_eta and M_alpha (paper-digest §6.3).
        if self.inner_lr_fixed is None:
            self.eta_weight = nn.Parameter(torch.empty(H, self.head_dim))
            self.eta_bias = nn.Parameter(torch.empty(H))
        if self.retention:
            self.alpha_weight = nn.Parameter(torch.empty(H, self.head_dim))
            self.alpha_bias = nn.Parameter(torch.empty(H))
        self.out_norm = RMSNorm(self.head_dim, cfg.norm_eps)               # per head
        self.w_gate = nn.Linear(D, D, bias=False)
        # w_out: the output projection W_o (not an MLP's second layer, as W_out is in memory.py, cms.py)
        self.w_out = nn.Linear(D, D, bias=False)
        self.w_out.is_residual_proj = True
        self.reset_memory_parameters()

    def reset_memory_parameters(self):
        """The scales above; LanguageModel calls this after its own init of the Linears."""
        nn.init.normal_(self.w_in.weight, std=W_IN_STD * self.d_model ** -0.5)
        nn.init.normal_(self.w_gate.weight, std=GATE_STD * self.d_model ** -0.5)
        for name, bias in (("eta", ETA_BIAS_INIT), ("alpha", ALPHA_BIAS_INIT)):
            if hasattr(self, f"{name}_weight"):
                nn.init.normal_(getattr(self, f"{name}_weight"), std=self.head_dim ** -0.5)
                nn.init.constant_(getattr(self, f"{name}_bias"), bias)

    def extra_repr(self):
        return (f"projection memories={self.projection_names}, chunk_other={self.chunk_other}, "
                f"chunk_mem={self.chunk_mem}, inner_opt={self.memory.update_rule}")

    # ------------------------------------------------------------------------------------

    def _heads(self, x):
        return x.view(*x.shape[:2], self.n_head, self.head_dim)

    @staticmethod
    def _gate(read, weight, bias):
        """sigmoid(w . M_B(x~) + b), one scalar per head. w and b are cast to the read's dtype
        (fp32 at least, also in a bf16 model), so the gate is fp32; under bf16 autocast the
        einsum itself runs in bf16, and adding the fp32 bias promotes its result back to fp32."""
        logit = torch.einsum("bthd,hd->bth", read, weight.to(read.dtype)) + bias.to(read.dtype)
        return torch.sigmoid(logit)

    def _projection_piece(self, features, state):
        """Stage 1 on one piece inside one C_other chunk: read k, v, q, eta, alpha at the
        chunk-start weights, then each projection memory learns its own target v^ = M_B(v)."""
        H = self.n_head
        reads = {}
        if self.projections is not None:
            n = len(self.projection_names)
            stacked = self.projections.read(state["chunk_start"], features.repeat(1, 1, n, 1))
            reads = dict(zip(self.projection_names, stacked.split(H, dim=2)))
        k = F.normalize(reads["k"] if self.adaptive_k else self._heads(self.w_k(features.flatten(2))), dim=-1)
        v = reads["v"] if self.adaptive_v else self._heads(self.w_v(features.flatten(2)))
        q = F.normalize(reads["q"], dim=-1) if self.adaptive_q else None
        if self.inner_lr_fixed is None:
            eta = self.eta_max * self._gate(reads["eta"], self.eta_weight, self.eta_bias)
        else:
            # in k's dtype at least fp32: a static k of a bf16 model would round the constant (0.3 -> 0.30078)
            eta = k.new_full(k.shape[:3], self.inner_lr_fixed, dtype=torch.promote_types(k.dtype, torch.float32))
        if self.retention:
            alpha = self._gate(reads["alpha"], self.alpha_weight, self.alpha_bias)
        else:
            alpha = k.new_ones(k.shape[:3])
        if self.projections is not None:
            n = len(self.projection_names)
            keys = k.repeat(1, 1, n, 1)
            # Each memory learns its own target M_B(v) (NL Eq. 87: scan's self_target). The
            # readouts of the projection memories are not used (they are read at chunk
            # starts), so the scans skip them (readout=False); the keys stand in as queries.
            # One piece lies inside one chunk, so on the fused path this is one kernel launch
            # (memory._use_fused_kernel).
            state = self.projections.scan(keys, keys, v.repeat(1, 1, n, 1), eta.repeat(1, 1, n),
                                          alpha.repeat(1, 1, n), state=state, self_target=True,
                                          readout=False).state
        return k, v, q, eta, alpha, state

    def _projection_stage(self, features, proj_state, pos):
        """Stage 1 over the segment: (k, v, q or None, eta, alpha, new projections state).
        Piece by piece; or, where projections_blocker finds nothing, piece by piece only up to the first
        chunk boundary, then everything after it in one fused launch."""
        T, C = features.shape[1], self.chunk_other
        proj_pos = pos if proj_state is None else proj_state["pos"]
        fused_from = tokens_to_boundary(proj_pos, C) if self.projections_blocker(features.device) is None else T
        parts = []
        for lo, hi in chunk_pieces(proj_pos, min(fused_from, T), C):
            *outs, proj_state = self._projection_piece(features[:, lo:hi], proj_state)
            parts.append(outs)
        if fused_from < T:
            from kernels.triton_hope import fused_hope_projections
            mem = self.projections
            f32 = lambda t: t.float()  # noqa: E731
            k, v, eta, alpha, weights, start = fused_hope_projections(
                f32(features[:, fused_from:]), *proj_state["weights"], f32(self.eta_weight),
                f32(self.eta_bias), f32(self.alpha_weight), f32(self.alpha_bias), self.eta_max, C,
                dgd=mem.update_rule == "dgd", activation=mem.activation,
                max_grad_norm=mem.max_grad_norm)
            parts.append((k, v, None, eta, alpha))
            proj_state = mem.state_after_launch(weights, start, None, proj_state["pos"] + T - fused_from)
        k, v, q, eta, alpha = (torch.cat(p, 1) if p[0] is not None else None for p in zip(*parts))
        return k, v, q, eta, alpha, proj_state

    def forward(self, x, state=None, pos=0):
        """x [B, T, D] (the block's normed input) -> (y [B, T, D], new state)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SelfModifyingTitans expects [B, T, {self.d_model}] inputs; got {list(x.shape)}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("SelfModifyingTitans needs at least one token")
        if state is None:           # fresh memories whose chunks align to absolute positions from pos
            state = {"conv": None, "pos": pos,
                     "projections": None if self.projections is None else self.projections.initial_state(B, pos),
                     "memory": self.memory.initial_state(B, pos)}
        elif state["pos"] != pos:
            raise ValueError(f"HOPE state is at position {state['pos']} but the input starts at {pos}")
        elif state["memory"]["weights"][0].shape[0] != B:
            raise ValueError(f"HOPE state holds fast weights for batch size "
                             f"{state['memory']['weights'][0].shape[0]}; the input has batch size {B}")
        features, conv_state = self.conv(self.w_in(x), state["conv"])
        features = self._heads(F.silu(features))                                # x~ [B, T, H, d]

        # Stage 1: projection memories (chunk C_other).
        k, v, q, eta, alpha, proj_state = self._projection_stage(features, state["projections"], pos)
        if q is None:
            q = F.normalize(self._heads(self.w_q(x)), dim=-1)

        # Stage 2: M_mem (chunk C_mem) learns its own target M_mem,B(v_t) (NL Eq. 87) and is
        # read after the write; one scan (the fused kernel where it applies, memory.py).
        out = self.memory.scan(q, k, v, eta, alpha, state=state["memory"], self_target=True)
        y = gated_output(self.w_out, self.out_norm, self.w_gate, out.y, x)    # Titans §4.4 output
        new_state = {"conv": conv_state, "projections": proj_state, "memory": out.state, "pos": pos + T}
        return y, new_state

    def projections_blocker(self, device) -> Optional[str]:
        """None where stage 1 runs as one launch per segment on `device` (kernels/
        triton_hope.py; after the pieces that finish a chunk begun in an earlier call,
        `_projection_stage`): the default projection set, a shape `fusable_projections` takes, and
        the settings in which the fused MLP memory kernel would take the projection memories
        (memory.NeuralMemory.fused_kernel_blocker); else why stage 1 runs piece by piece."""
        from kernels.triton_hope import PROJECTIONS, fusable_projections
        mem = self.projections
        if self.projection_names != PROJECTIONS:
            return f"the fused stage 1 takes the projections {PROJECTIONS}, not {self.projection_names}"
        if not fusable_projections(mem.head_dim, mem.hidden_dim // mem.head_dim, mem.chunk_size):
            return (f"the fused stage 1 does not cover d={mem.head_dim}, hidden {mem.hidden_dim}, "
                    f"chunk_other {mem.chunk_size} (triton_hope.fusable_projections)")
        return mem.fused_kernel_blocker(device, self_target=True)

    def kernel_paths(self, device) -> dict:
        """{part: None if it runs fused on `device`, else why not} (model.kernel_report)."""
        paths = {"HOPE M_mem": self.memory.fused_kernel_blocker(device, self_target=True)}
        if self.projections is not None:
            paths["HOPE stage 1 (projection memories)"] = self.projections_blocker(device)
        return paths

    def memory_flops_per_token(self, seq_len: int = 0, backward: bool = True) -> int:
        """Estimated training FLOPs per token of the inner loops (the memories' reads,
        targets, closed-form gradients and scans; the static projections are in the
        model's 6N). Independent of seq_len (a recurrence)."""
        total = self.memory.flops_per_token(backward)
        reads = self.memory.read_flops()                                 # one M(x) per head
        total += (FWD_BWD if backward else 1) * self.n_head * reads      # the target M_mem,B(v)
        if self.projections is not None:
            n = len(self.projection_names)
            total += self.projections.flops_per_token(backward)
            total += (FWD_BWD if backward else 1) * 2 * n * self.n_head * reads  # read x~ and v
        return total
