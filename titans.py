"""Titans: neural long-term memory as a sequence mixer (arXiv 2501.00663; DESIGN §3.4).

`model.make_block` builds a Titans block as Block(mixer, SwiGLU) with the mixer chosen by
`model.titans.variant`:

    lmm   memory only                 W_o(RMSNorm(M_t(q_t)) * SiLU(W_g x))
    mac   memory as context           per segment: attention over [persistent | memory
                                      readout h | segment], memory updated with the
                                      attention output y, o = y (x) M_t(y)   (Titans Eq. 21-25)
    mag   memory as gate              W_o(RMSNorm(SWA(x)) * sigmoid(RMSNorm(M_t(q_t))))
    mal   memory as layer             u = x + LMM(x);  o = LMM(x) + W_o SWA(RMSNorm(u))

The memory branch (`LongTermMemory`): q, k, v = SiLU(causal depthwise conv4(W x)) per
head, q and k L2-normalised (Titans §4.4); per-token per-head gates from x:
theta_t = theta_max * sigmoid(.) (inner lr), beta_t = sigmoid(.) (momentum, "eta_t" in
Titans Eq. 14), forget_t = sigmoid(.) with alpha_t = 1 - forget_t (Eq. 13); then the
chunked memory layer of `memory.py` with GD + momentum. With `model.titans.step_budget`
theta_t is first capped by what its chunk has left to step along k_t
(`memory.chunk_step_budget`, our stabiliser for long sequences; the chunk's spent matrix is
carried in the state).

Persistent memory (Titans §3.3): N_p learned tokens per attention layer, in the
attention's input space, projected by its own W_k, W_v, without RoPE, and visible to every
query regardless of causality or the sliding window ("SW-Attn*" with a prefix). They are
an attention prefix only (not written into the long-term memory), which keeps streaming
exact with no special first segment; `lmm` has no attention and so no persistent tokens.

Every mixer is `forward(x, state=None, pos=0) -> (y, state)`; the state holds conv
buffers, the memory's fast weights / momenta / chunk-start weights, KV caches and (MAC)
the current segment's cache and segment-start weights, so one call == any segmentation.
The memory computes in float32 also in a bf16 model, with or without autocast
(memory.py); its readouts are cast to the mixer input's dtype where they meet the model's
weights (tests/test_model.py::test_bf16_weights_train_without_autocast).
The choices where the paper is silent are listed in docs/FIDELITY.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from config import ModelConfig
from memory import FWD_BWD, NeuralMemory, budget_kernel_blocker, chunk_pieces, chunk_step_budget
from model import AttentionHeads, CausalDepthwiseConv, RMSNorm, at_least_fp32, attention_mask, causal_attention

VARIANTS = ("lmm", "mac", "mag", "mal")


def check_titans_config(cfg: ModelConfig):
    """One-line errors for Titans settings: TitansConfig's own range checks, run again here
    for a config changed after it was built, and the variant (a choice of load_config)."""
    t = cfg.titans
    if t.variant not in VARIANTS:
        raise ValueError(f"model.titans.variant must be one of {', '.join(VARIANTS)}; got {t.variant!r}")
    t.__post_init__()


# ----------------------------------------------------------------------------------------
# pieces of the memory branch

# Gate biases at init (the paper gives none): theta = 0.12 theta_max, momentum 0.5,
# forget 0.018 (a memory horizon of ~50 tokens that the outer loop can lengthen).
GATE_BIAS = {"theta": -2.0, "beta": 0.0, "forget": -4.0}


class LongTermMemory(nn.Module):
    """The neural long-term memory branch: x [B, T, D] -> readouts M_t(q_t) [B, T, H, d].

    q, k, v = SiLU(conv(W x)) per head, q and k L2-normalised; gates per token and head;
    NeuralMemory (GD with momentum, Titans Eq. 13-14) updated with (k_t, v_t) and read
    with q_t after the write. State: {"conv": [q, k, v conv buffers], "memory": ...,
    "spent": the step budget's P of the current chunk, or None}.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.titans
        D, self.n_head = cfg.d_model, cfg.n_head
        self.head_dim = D // cfg.n_head
        self.wq, self.wk, self.wv = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.conv_q, self.conv_k, self.conv_v = (CausalDepthwiseConv(D, t.conv_size) for _ in range(3))
        self.w_gates = nn.Linear(D, 3 * cfg.n_head, bias=True)     # theta, beta, forget logits
        self.theta_max, self.inner_lr_fixed = t.theta_max, t.inner_lr_fixed
        self.use_momentum, self.use_forget = t.momentum, t.weight_decay
        self.step_budget = t.step_budget
        self.memory = NeuralMemory(cfg.n_head, self.head_dim, depth=t.memory_depth,
                                   expansion=t.memory_expansion, activation=t.activation,
                                   chunk_size=t.chunk_size, update_rule="momentum",
                                   max_grad_norm=t.max_grad_norm, detach_targets=t.detach_targets,
                                   detach_chunks_older_than=t.detach_chunks_older_than,
                                   backend=cfg.kernels)
        self.reset_memory_parameters()

    def reset_memory_parameters(self):
        with torch.no_grad():
            bias = self.w_gates.bias.view(3, self.n_head)
            for row, name in enumerate(("theta", "beta", "forget")):
                bias[row].fill_(GATE_BIAS[name])

    def initial_state(self, batch_size, pos=0):
        return {"conv": [None, None, None], "memory": self.memory.initial_state(batch_size, pos), "spent": None}

    def _heads(self, x):
        return x.view(*x.shape[:2], self.n_head, self.head_dim)

    def queries(self, x, conv_state=None):
        """q = L2norm(SiLU(conv(W_q x))) [B, T, H, d] with its own conv buffer (MAC reads
        the memory with queries from the segment while its updates come from y)."""
        q, conv_state = self.conv_q(self.wq(x), conv_state)
        return F.normalize(at_least_fp32(self._heads(F.silu(q))), dim=-1), conv_state

    def gates(self, x):
        """(lr = theta_t, alpha_t = 1 - forget_t, beta_t), each [B, T, H]."""
        logits = at_least_fp32(self.w_gates(x)).view(*x.shape[:2], 3, self.n_head)
        theta = self.theta_max * torch.sigmoid(logits[:, :, 0])
        if self.inner_lr_fixed is not None:
            theta = torch.full_like(theta, self.inner_lr_fixed)
        beta = torch.sigmoid(logits[:, :, 1]) if self.use_momentum else torch.zeros_like(theta)
        # 1 - sigmoid(f), written sigmoid(-f): the difference rounds to multiples of ~6e-8 and is
        # exactly 0 from f ~ 17, where sigmoid(-f) keeps its precision (to ~1e-38)
        alpha = torch.sigmoid(-logits[:, :, 2]) if self.use_forget else torch.ones_like(theta)
        return theta, alpha, beta

    def forward(self, x, state=None, pos=0):
        state = self.initial_state(x.shape[0], pos) if state is None else state
        q, conv_q = self.queries(x, state["conv"][0])
        k, conv_k = self.conv_k(self.wk(x), state["conv"][1])
        v, conv_v = self.conv_v(self.wv(x), state["conv"][2])
        k = F.normalize(at_least_fp32(self._heads(F.silu(k))), dim=-1)
        v = at_least_fp32(self._heads(F.silu(v)))
        lr, alpha, beta = self.gates(x)
        spent = None
        if self.step_budget is not None:        # our stabiliser (memory.chunk_step_budget)
            lr, spent = chunk_step_budget(k, lr, 1 - beta, state["spent"], state["memory"]["pos"],
                                          self.memory.chunk_size, self.step_budget,
                                          kernels.select_backend(self.memory.backend, k.device, k.dtype))
        y, memory_state = self.memory(q, k, v, lr, alpha, beta, state["memory"])
        return y, {"conv": [conv_q, conv_k, conv_v], "memory": memory_state, "spent": spent}

    def kernel_paths(self, device):
        """{part: None if it runs fused on `device`, else why not} (model.kernel_report)."""
        paths = {"Titans memory": self.memory.fused_kernel_blocker(device)}
        if self.step_budget is not None:        # keys are fp32 here (forward: at_least_fp32)
            paths["Titans step budget"] = budget_kernel_blocker(self.memory.backend, device, self.memory.chunk_size)
        return paths

    def idle_parameters(self, seq_len):
        """The gate projection when no gate reads it (a fixed inner lr, no momentum, no weight
        decay: `gates` returns constants), so that DDP expects it to get no gradient
        (model.LanguageModel.idle_parameters); else []."""
        if self.inner_lr_fixed is not None and not self.use_momentum and not self.use_forget:
            return list(self.w_gates.parameters())
        return []

    def flops_per_token(self):
        """Inner-loop FLOPs (forward + backward) of the memory, beyond the 6N of the
        projections; the conv and gates are negligible."""
        return self.memory.flops_per_token()


# ----------------------------------------------------------------------------------------
# attention with a persistent-memory prefix

def prefix_attention(q, k, v, q_pos, k_pos, prefix_k=None, prefix_v=None, window=None, backend="auto"):
    """Softmax attention (q [B, Tq, H, d], k/v [B, Tk, H, d]) where query i sees key j iff
    k_pos[j] <= q_pos[i] (and k_pos[j] > q_pos[i] - window), plus N_p prefix keys
    [1, N_p, H, d] that every query sees (Titans persistent memory)."""
    if prefix_k is None:
        return causal_attention(q, k, v, q_pos, k_pos, window, backend)
    B = q.shape[0]
    allowed = attention_mask(q_pos, k_pos, window)
    prefix_allowed = torch.ones(q.shape[1], prefix_k.shape[1], dtype=torch.bool, device=q.device)
    allowed = torch.cat([prefix_allowed, allowed], dim=1)
    k = torch.cat([prefix_k.expand(B, -1, -1, -1).to(k.dtype), k], dim=1)
    v = torch.cat([prefix_v.expand(B, -1, -1, -1).to(v.dtype), v], dim=1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed)
    return y.transpose(1, 2)


class PersistentAttention(AttentionHeads):
    """model.AttentionHeads (multi-head attention with RoPE, an optional sliding window and
    a KV cache of the last window - 1 keys) with N_p persistent tokens as an always-visible
    prefix. Returns per-head outputs [B, T, H, d] (the caller owns the output projection)."""

    def __init__(self, cfg: ModelConfig, window=None, n_persistent=0):
        super().__init__(cfg, window)
        self.persistent = nn.Parameter(torch.empty(n_persistent, cfg.d_model)) if n_persistent else None
        self.reset_memory_parameters()

    def reset_memory_parameters(self):
        if self.persistent is not None:     # like the block's RMS-normalised inputs
            nn.init.normal_(self.persistent, mean=0.0, std=1.0)

    def prefix(self, dtype):
        """Keys and values of the persistent tokens [1, N_p, H, d] (no RoPE: no position)."""
        if self.persistent is None:
            return None, None
        kv = F.linear(self.persistent.to(dtype), self.wqkv.weight[self.wqkv.out_features // 3:].to(dtype))
        k, v = kv.view(1, -1, 2, self.n_head, self.head_dim).unbind(2)
        return k, v

    def attend(self, q, k, v, q_pos, k_pos):
        """AttentionHeads.attend with the persistent tokens' keys and values as a prefix
        that every query sees."""
        prefix_k, prefix_v = self.prefix(q.dtype)
        return prefix_attention(q, k, v, q_pos, k_pos, prefix_k, prefix_v, self.window, self.attention_backend)

    def flops_per_token(self, context):
        """Forward + backward FLOPs of the score and value products per token for
        `context` visible keys (PaLM's 12 * D * T convention, causality not discounted)."""
        return 12 * self.n_head * self.head_dim * (context + (0 if self.persistent is None else self.persistent.shape[0]))


def _flat(x):
    return x.reshape(*x.shape[:2], -1)


def gated_output(w_out, out_norm, w_gate, o, x):
    """Titans §4.4's output of a memory readout o [B, T, H, d] for the mixer input x
    [B, T, D]: W_out(RMSNorm(o) * SiLU(W_gate x)), normalised per head (out_norm of width d),
    o cast to x's dtype first (the memory computes in fp32). The modules are the caller's, so
    its parameter names stay its own (TitansLMM, hope.SelfModifyingTitans)."""
    return w_out(_flat(out_norm(o.to(x.dtype))) * F.silu(w_gate(x)))


def memory_gate(attn_norm, memory_norm, y, r):
    """The MAG/MAC combination of attention heads y and memory readouts r [B, T, H, d]:
    RMSNorm(y) * sigmoid(RMSNorm(r)), per head, r cast to y's dtype (before the caller's W_o)."""
    return attn_norm(y) * torch.sigmoid(memory_norm(r.to(y.dtype)))


# ----------------------------------------------------------------------------------------
# the four variants

class TitansLMM(nn.Module):
    """LMM: the memory alone. o = W_o(RMSNorm(M_t(q_t)) * SiLU(W_g x)) (Titans §4.4:
    output normalisation and linear gating before the output projection)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory = LongTermMemory(cfg)
        self.out_norm = RMSNorm(cfg.d_model // cfg.n_head, cfg.norm_eps)   # per head
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo.is_residual_proj = True

    def forward(self, x, state=None, pos=0):
        y, state = self.memory(x, state, pos)
        return gated_output(self.wo, self.out_norm, self.w_gate, y, x), state

    def memory_flops_per_token(self, seq_len):
        return self.memory.flops_per_token()

    def attention_flops_per_token(self, seq_len):
        return 0


class TitansMAG(nn.Module):
    """MAG (Titans §4.2): sliding-window attention with the persistent prefix and the
    memory branch side by side on the same input, combined by a gate:
        o = W_o( RMSNorm(SWA(x)) * sigmoid(RMSNorm(M_t(q_t))) )
    both branches normalised by learnable per-head vectors; the nonlinearity (sigmoid on
    the memory branch) is our choice (the paper names only "a non-linearity")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.titans
        d = cfg.d_model // cfg.n_head
        self.attn = PersistentAttention(cfg, window=t.window_size, n_persistent=t.n_persistent)
        self.memory = LongTermMemory(cfg)
        self.attn_norm, self.memory_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo.is_residual_proj = True

    def forward(self, x, state=None, pos=0):
        state = state or {"attn": None, "memory": None}
        a, attn_state = self.attn(x, state["attn"], pos)
        m, memory_state = self.memory(x, state["memory"], pos)
        o = memory_gate(self.attn_norm, self.memory_norm, a, m)
        return self.wo(_flat(o)), {"attn": attn_state, "memory": memory_state}

    def memory_flops_per_token(self, seq_len):
        return self.memory.flops_per_token()

    def attention_flops_per_token(self, seq_len):
        return self.attn.flops_per_token(min(seq_len, self.attn.window))


class TitansMAL(nn.Module):
    """MAL (Titans §4.3): the memory as a layer, then sliding-window attention (with the
    persistent prefix) on its output, each with its own residual:
        m = LMM(x);  u = x + m;  o = m + W_o SWA(RMSNorm(u))    (the block adds x back)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.titans
        self.lmm = TitansLMM(cfg)
        self.attn_in_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = PersistentAttention(cfg, window=t.window_size, n_persistent=t.n_persistent)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo.is_residual_proj = True

    def forward(self, x, state=None, pos=0):
        state = state or {"lmm": None, "attn": None}
        m, lmm_state = self.lmm(x, state["lmm"], pos)
        a, attn_state = self.attn(self.attn_in_norm(x + m), state["attn"], pos)
        return m + self.wo(_flat(a)), {"lmm": lmm_state, "attn": attn_state}

    def memory_flops_per_token(self, seq_len):
        return self.lmm.memory_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len):
        return self.attn.flops_per_token(min(seq_len, self.attn.window))


class TitansMAC(nn.Module):
    """MAC (Titans §4.1, Eq. 21-25), per segment S of C_seg tokens (aligned to absolute
    positions; a call may start or stop inside a segment):
        h_t = M*_{seg start}(q_t)         memory read (no update) with the segment's queries (21)
        y   = Attn([persistent | h | S])  causal: token i sees the prefix, h_j and x_j, j <= i (22-23)
        M   <- updated with y             keys/values/gates from RMSNorm(y)             (24)
        o_t = y_t (x) M*_t(y_t)           = W_o(RMSNorm(y) * sigmoid(RMSNorm(M_t(q(y)))))  (25)
    h_j is M*(q_j), a function of token j, so it is visible only from position j on (the
    paper's full attention over h would let a token see queries of later tokens). The
    state keeps the segment-start weights and the segment's keys/values so far."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.titans
        d = cfg.d_model // cfg.n_head
        self.segment_size = t.segment_size
        self.attn = PersistentAttention(cfg, window=None, n_persistent=t.n_persistent)
        self.memory = LongTermMemory(cfg)
        self.h_norm = RMSNorm(cfg.d_model, cfg.norm_eps)        # memory readouts as tokens
        self.y_norm = RMSNorm(cfg.d_model, cfg.norm_eps)        # attention output -> memory
        self.attn_norm, self.memory_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo.is_residual_proj = True

    def forward(self, x, state=None, pos=0):
        B = x.shape[0]
        if state is None:
            if pos % self.segment_size:     # no segment-start weights to read h with
                raise ValueError(f"TitansMAC: a call without state starts a sequence, so pos must "
                                 f"start a segment (a multiple of {self.segment_size}), got {pos}")
            state = {"memory": self.memory.initial_state(B, pos), "query_conv": None,
                     "segment_weights": None, "cache": None}
        memory_state, query_conv = state["memory"], state["query_conv"]
        segment_weights, cache = state["segment_weights"], state["cache"]
        prefix_k, prefix_v = self.attn.prefix(x.dtype)
        outputs = []
        for lo, hi in chunk_pieces(pos, x.shape[1], self.segment_size):
            start = pos + lo
            if start % self.segment_size == 0:                   # a new segment begins
                segment_weights, cache = memory_state["memory"]["weights"], None
            seg_start = start - start % self.segment_size
            xs = x[:, lo:hi]
            # (21) h = M*(q) at the segment-start weights, as tokens in the model space
            q_mem, query_conv = self.memory.queries(xs, query_conv)
            h = self.h_norm(_flat(self.memory.memory.read(segment_weights, q_mem)).to(x.dtype))
            # (22-23) attention over [persistent | h | S], causal by position
            q, k_x, v_x = self.attn.project(xs, start)
            _, k_h, v_h = self.attn.project(h, start)
            if cache is not None:
                k_h, v_h = torch.cat([cache["k_h"], k_h], 1), torch.cat([cache["v_h"], v_h], 1)
                k_x, v_x = torch.cat([cache["k_x"], k_x], 1), torch.cat([cache["v_x"], v_x], 1)
            cache = {"k_h": k_h, "v_h": v_h, "k_x": k_x, "v_x": v_x}
            seen = torch.arange(seg_start, pos + hi, device=x.device)
            y = prefix_attention(q, torch.cat([k_h, k_x], 1), torch.cat([v_h, v_x], 1),
                                 torch.arange(start, pos + hi, device=x.device),
                                 torch.cat([seen, seen]), prefix_k, prefix_v, None, self.attn.attention_backend)
            # (24) write y into the memory, (25) gate y with the read after the write
            r, memory_state = self.memory(self.y_norm(_flat(y)), memory_state)
            o = memory_gate(self.attn_norm, self.memory_norm, y, r)
            outputs.append(self.wo(_flat(o)))
        y = torch.cat(outputs, 1) if outputs else x.new_zeros(x.shape)
        return y, {"memory": memory_state, "query_conv": query_conv,
                   "segment_weights": segment_weights, "cache": cache}

    # MAC applies some weights to every token twice, where the model's 6N counts them once: the
    # memory's query projection and conv (read-queries for h from x, the memory's own from y)
    # and the attention's W_qkv (on x and on h). A second pass costs 2 FLOPs per weight entry
    # forward, FWD_BWD times that with the backward.

    def memory_flops_per_token(self, seq_len):
        """The memory's inner loop, plus the h reads M*(q)."""
        m = self.memory.memory
        return self.memory.flops_per_token() + FWD_BWD * m.n_head * m.read_flops()

    def attention_flops_per_token(self, seq_len):
        """Scores and values over the h and S keys, plus the dense second passes (inside the
        model's 6N + attention, so in the MFU): W_qkv on h, and the memory's W_Q and conv on
        x for h's read queries."""
        second = [self.attn.wqkv.weight, self.memory.wq.weight, *self.memory.conv_q.parameters()]
        return (self.attn.flops_per_token(2 * min(seq_len, self.segment_size))
                + FWD_BWD * 2 * sum(p.numel() for p in second))


MIXERS = {"lmm": TitansLMM, "mac": TitansMAC, "mag": TitansMAG, "mal": TitansMAL}


def make_titans_mixer(cfg: ModelConfig) -> nn.Module:
    """The sequence mixer of a Titans block for `model.titans.variant`."""
    check_titans_config(cfg)
    return MIXERS[cfg.titans.variant](cfg)
