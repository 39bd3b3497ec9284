"""The language models: Transformer++, Titans, HOPE and HOPE-attention (DESIGN §3).

Every architecture is the same stack, chosen by `model.arch`:

    tokens -> embedding -> n_layer x Block -> RMSNorm -> LM head (tied to the embedding
                                                           unless model.tie_embeddings=false)
    Block(x) = x + mixer(RMSNorm(x));  x + ffn(RMSNorm(x))

and differs only in the block's sequence mixer (softmax attention, a Titans memory, a
self-modifying HOPE memory) and channel mixer (SwiGLU FFN or the Continuum Memory System).
This file says *what* each architecture computes; `kernels/` says how fast.

    logits, loss, state = model(idx, targets=None, state=None)

`state` carries everything a later segment needs (KV caches, conv buffers, fast weights),
so feeding a sequence in one call or in consecutive segments gives the same logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig, model_config_from

# The smallest sampling temperature above 0 (greedy): fp32 logits divided by a much smaller one
# overflow to inf, and sampling from them fails (generate; sample.py's --temperature)
MIN_TEMPERATURE = 1e-6

try:  # flash-attn is optional and CUDA-only; SDPA is the fallback everywhere
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None


# ----------------------------------------------------------------------------------------
# building blocks

def at_least_fp32(x):
    """x in float32, or in its own dtype where that is wider (float64 tests stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = at_least_fp32(x)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class CausalDepthwiseConv(nn.Module):
    """Per-channel causal conv of width w over time, the short conv before a memory's
    projections (Titans §4.4; NL §8.3 "local convolutions with window size of 4"):
    y_t = sum_j weight[:, j] x_{t-(w-1)+j}. Its state is the last w - 1 inputs, so a segment
    continues exactly where the previous one stopped. width 0 = off (identity)."""

    def __init__(self, channels, width):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width)) if width else None
        self.reset_memory_parameters()

    def reset_memory_parameters(self):
        if self.weight is not None:       # nn.Conv1d's default range for a depthwise kernel
            nn.init.uniform_(self.weight, -self.width ** -0.5, self.width ** -0.5)

    def forward(self, x, state=None):
        """x [B, T, C] -> (y [B, T, C], state [B, w - 1, C])."""
        if not self.width:
            return x, None
        B, T, C = x.shape
        if state is None:
            state = x.new_zeros(B, self.width - 1, C)
        elif tuple(state.shape) != (B, self.width - 1, C):
            raise ValueError(f"conv state must be {[B, self.width - 1, C]}; got {list(state.shape)}")
        padded = torch.cat([state.to(x.dtype), x], dim=1)
        weight = self.weight.to(x.dtype)
        # w shifted products: for w = 4 much faster on CPU than F.conv1d's depthwise path,
        # whose backward is slow
        y = sum(padded[:, j:j + T] * weight[:, j] for j in range(self.width))
        # a copy, not a view: a view of `padded` would keep the whole segment's inputs alive
        # in the state between calls (a streamed eval holds every layer's state)
        return y, padded[:, padded.shape[1] - (self.width - 1):].clone()


def rope_cos_sin(positions, head_dim, theta, device, dtype=torch.float32):
    """Rotary embedding tables for absolute `positions` (a 1-D int tensor), in float32 (or
    the wider `dtype` of a float64 model). The angles p * theta^(-2i/D) are computed in
    float64: in float32 their rounding grows with p (relative 6e-8 of an angle of up to p
    radians), so two tokens a few positions apart were rotated up to 0.05 rad wrong relative
    to each other at 1M streamed tokens and 0.4 rad at 10M (BABILong's longest), where only
    their distance should count. A [T, D/2] table: float64 costs nothing here."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = positions.to(device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    dtype = torch.promote_types(dtype, torch.float32)
    return angles.cos().to(dtype), angles.sin().to(dtype)               # [T, head_dim/2]


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; rotate pairs (x1, x2) of the two halves of the head dim."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SwiGLU(nn.Module):
    """Llama FFN: W_down (SiLU(W_gate x) * W_up x), no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.w_down.is_residual_proj = True

    def forward(self, x, state=None, pos=0):        # stateless: (y, None) at any position
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)), None


def hidden_width(cfg: ModelConfig, mult: float) -> int:
    """An MLP's hidden width: int(mult * d_model) (truncated, as in Llama), rounded up to a
    multiple of model.ffn_multiple_of. Serves the SwiGLU FFN (mult = ffn_mult) and every
    CMS level (mult = cms.hidden_mult)."""
    return cfg.ffn_multiple_of * math.ceil(int(mult * cfg.d_model) / cfg.ffn_multiple_of)


def ffn_hidden(cfg: ModelConfig) -> int:
    return hidden_width(cfg, cfg.ffn_mult)


# ----------------------------------------------------------------------------------------
# softmax attention (Transformer++; also the attention inside Titans and HOPE-attention)

def causal_attention(q, k, v, q_pos, k_pos, window=None, backend="auto"):
    """Softmax attention of queries at absolute positions q_pos over keys at k_pos.

    q [B, Tq, H, D], k/v [B, Tk, H, D]. A query sees keys with k_pos <= q_pos (and, with a
    sliding `window`, k_pos > q_pos - window). Uses flash-attn when available on CUDA for
    the plain causal case, PyTorch SDPA otherwise.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    # Keys end at the last query (callers pass aligned positions), so Tq == Tk means no
    # cache: plain causal attention. Decided from shapes, not tensor values, so that
    # torch.compile does not break the graph here.
    plain_causal = window is None and Tq == Tk
    if (backend in ("auto", "flash") and flash_attn_func is not None and q.is_cuda
            and plain_causal and q.dtype in (torch.float16, torch.bfloat16)):
        return flash_attn_func(q, k, v, causal=True)
    if backend == "flash" and flash_attn_func is None:        # LanguageModel refuses it up front
        raise ValueError("model.attention=flash but flash-attn is not installed")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                    # [B, H, T, D]
    if plain_causal:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(q_pos, k_pos, window))
    return y.transpose(1, 2)


def attention_mask(q_pos, k_pos, window=None):
    """[Tq, Tk] bool: query i sees key j iff k_pos[j] <= q_pos[i] (and, with a sliding
    `window`, k_pos[j] > q_pos[i] - window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def project_qkv(wqkv: nn.Linear, x, pos, n_head, rope_theta):
    """q, k, v [B, T, H, d] of the tokens x [B, T, D] at absolute positions pos.. from one
    fused projection, RoPE on q and k."""
    B, T, D = x.shape
    q, k, v = wqkv(x).view(B, T, 3, n_head, D // n_head).unbind(2)
    cos, sin = rope_cos_sin(torch.arange(pos, pos + T, device=x.device), D // n_head, rope_theta,
                            x.device, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def extend_kv_cache(cache, k, v, end, window=None):
    """Prepend the cached keys and values (`cache` = {"k", "v"} or None) to this call's k, v
    [B, T, H, d], whose last token is at position end - 1. Returns (k, v, k_pos: their
    absolute positions, the new cache: every key, or with a sliding `window` only the last
    window - 1, all that a later query can see)."""
    if cache is not None:
        k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
    k_pos = torch.arange(end - k.shape[1], end, device=k.device)
    if window is None or k.shape[1] < window:
        return k, v, k_pos, {"k": k, "v": v}
    # The last window - 1 keys as copies: views would keep all of this call's keys and values
    # (and, through v, the fused q/k/v projection) alive in the state between calls
    keep = window - 1
    return k, v, k_pos, {"k": k[:, k.shape[1] - keep:].clone(), "v": v[:, v.shape[1] - keep:].clone()}


class AttentionHeads(nn.Module):
    """Causal multi-head attention with RoPE and a KV cache (`state = {"k", "v"}`), up to
    the per-head outputs [B, T, H, d]: no output projection (`Attention` adds one; Titans'
    `PersistentAttention` adds a persistent prefix and leaves the projection to its caller).

    With `window` set it is sliding-window attention and the cache keeps only the last
    `window - 1` keys, so memory stays flat while streaming (Titans MAG/MAL).
    """

    def __init__(self, cfg: ModelConfig, window=None):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.rope_theta, self.window, self.attention_backend = cfg.rope_theta, window, cfg.attention
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)

    def project(self, x, pos):
        """q, k, v [B, T, H, d] of tokens at absolute positions pos.., RoPE on q and k."""
        return project_qkv(self.wqkv, x, pos, self.n_head, self.rope_theta)

    def attend(self, q, k, v, q_pos, k_pos):
        """The heads' outputs [B, Tq, H, d] of queries at q_pos over keys at k_pos."""
        return causal_attention(q, k, v, q_pos, k_pos, self.window, self.attention_backend)

    def forward(self, x, state=None, pos=0):
        """x [B, T, D] -> (per-head outputs [B, T, H, d], new KV cache)."""
        T = x.shape[1]
        q, k, v = self.project(x, pos)
        k, v, k_pos, new_state = extend_kv_cache(state, k, v, pos + T, self.window)
        q_pos = torch.arange(pos, pos + T, device=x.device)
        return self.attend(q, k, v, q_pos, k_pos), new_state


class Attention(AttentionHeads):
    """The attention sequence mixer (Transformer++, HOPE-attention): AttentionHeads, then
    the output projection W_o of the concatenated heads."""

    def __init__(self, cfg: ModelConfig, window=None):
        super().__init__(cfg, window)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo.is_residual_proj = True

    def forward(self, x, state=None, pos=0):
        y, new_state = super().forward(x, state, pos)
        return self.wo(y.reshape(*x.shape[:2], -1)), new_state


# ----------------------------------------------------------------------------------------
# the block and the model

class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, mixer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x, state=None, pos=0, return_state=True):
        """-> (x [B, T, D], the block's state after x; None with return_state=False)."""
        state = state or {}
        h, mixer_state = self.mixer(self.mixer_norm(x), state.get("mixer"), pos=pos)
        x = x + h
        h, ffn_state = self.ffn(self.ffn_norm(x), state.get("ffn"), pos=pos)
        return x + h, ({"mixer": mixer_state, "ffn": ffn_state} if return_state else None)


def make_block(cfg: ModelConfig) -> Block:
    """model.arch -> (sequence mixer, channel mixer) of one block."""
    if cfg.arch == "transformer":
        return Block(cfg, Attention(cfg), SwiGLU(cfg.d_model, ffn_hidden(cfg)))
    if cfg.arch == "titans":                   # titans.py imports this module: import late
        from titans import make_titans_mixer
        return Block(cfg, make_titans_mixer(cfg), SwiGLU(cfg.d_model, ffn_hidden(cfg)))
    if cfg.arch in ("hope", "hope_attention"):  # hope.py and cms.py import this module: import late
        from cms import ContinuumMemory
        from hope import SelfModifyingTitans
        mixer = SelfModifyingTitans(cfg) if cfg.arch == "hope" else Attention(cfg)
        # HOPE block (NL Eq. 94-97) / HOPE-attention: the CMS chain replaces the FFN.
        ffn = ContinuumMemory(cfg) if cfg.hope.cms else SwiGLU(cfg.d_model, ffn_hidden(cfg))
        return Block(cfg, mixer, ffn)
    raise ValueError(f"unknown model.arch={cfg.arch!r}")       # config.py's choices stop it first


def check_sampling(max_new_tokens, temperature, top_k, vocab_size=None) -> float:
    """generate's arguments checked (one-line ValueErrors): the temperature as a float."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    # a NaN temperature makes every probability NaN (MIN_TEMPERATURE: the overflow)
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be a finite number, 0 (greedy) or >= {MIN_TEMPERATURE:g}; "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 = all tokens); got {top_k!r}")
    # logits[:, :vocab_size]: 0 left nothing to draw from, and a negative one silently cut ids off the end
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an integer >= 1; got {vocab_size!r}")
    return value


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (train.py takes it from the tokenizer when it is 0)")
        if cfg.attention == "flash" and flash_attn_func is None:
            raise ValueError("model.attention=flash needs the flash-attn package (CUDA only: pip install "
                             "flash-attn); use model.attention=auto or sdpa")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([make_block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2/nanoGPT init: N(0, 0.02), residual output projections scaled by 1/sqrt(2L).
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "is_residual_proj", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        # Then a module's own init (`apply` visits children first, so this runs after the
        # generic init of its Linears): memories' initial fast weights, convs, persistent
        # tokens, Titans' gate biases, HOPE's rescaled projections and gate parameters.
        if hasattr(module, "reset_memory_parameters"):
            module.reset_memory_parameters()

    def forward(self, idx, targets=None, state=None, return_state=True):
        """idx [B, T] int64 -> (logits [B, T, vocab], loss or None, state).

        return_state=False (a training forward, whose state nobody reads): the state is None
        and no block hands its end state back (KV caches, fast weights, CMS levels), so each
        one is freed when its block finishes. Under activation checkpointing the returned
        states were the only references left to them, held through the whole forward: every
        layer's KV cache (which also pins the fused q/k/v projection; ~10 GB for a
        Transformer++-760M micro-batch of 8 x 4K in bf16) or CMS fast weights (~6 GB for
        HOPE-760M's)."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"the model reads idx [B, T] with T >= 1 tokens; got shape {list(idx.shape)}")
        held = _batch_of(state)
        if held is not None and held != idx.shape[0]:
            raise ValueError(f"the state holds {held} sequences, but idx has batch size {idx.shape[0]}")
        held, made = _precision_of(state), torch.promote_types(self.embed.weight.dtype, torch.float32)
        if held is not None and held != made:
            raise ValueError(f"the state holds {held} tensors, but this model's states are {made}: cast the "
                             f"state's tensors, or pass the model of that precision")
        pos = 0 if state is None else state["pos"]
        layer_states = [None] * len(self.blocks) if state is None else state["layers"]
        if len(layer_states) != len(self.blocks):     # zip below would skip the blocks past the shorter
            raise ValueError(f"the state holds {len(layer_states)} layers, but this model has {len(self.blocks)}")
        x = self.embed(idx)
        new_layer_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state = block(x, layer_state, pos=pos, return_state=return_state)
            new_layer_states.append(layer_state)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, ({"pos": pos + idx.shape[1], "layers": new_layer_states} if return_state else None)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, state=None, generator=None,
                 vocab_size=None):
        """Sample `max_new_tokens` after `idx` [B, T], reusing the state (KV cache, fast weights):
        idx followed by the new tokens, [B, T + max_new_tokens]. temperature 0 (or below):
        greedy; top_k None or 0: the whole vocabulary. vocab_size: sample only ids below it (the
        tokenizer's, where model.vocab_size is padded, e.g. 50304 for GPT-2). Bad arguments, and
        logits that are not finite (a model diverged on a long stream), are one-line ValueErrors."""
        check_sampling(max_new_tokens, temperature, top_k, vocab_size)
        logits, _, state = self(idx, state=state)
        return torch.cat([idx, self.generate_from(logits[:, -1], state, max_new_tokens, temperature, top_k,
                                                  generator, vocab_size)], dim=1)

    @torch.no_grad()
    def generate_from(self, last_logits, state, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                      vocab_size=None):
        """The new tokens [B, max_new_tokens] of `generate`, after a forward that returned
        `state` and `last_logits` [B, vocab] (its last position's). A forward returns a new state
        and leaves the one it was passed as it was, so one prompt's forward serves any number of
        samples (sample.py)."""
        temperature = check_sampling(max_new_tokens, temperature, top_k, vocab_size)
        logits, out = last_logits, []
        for step in range(max_new_tokens):
            next_logits = logits[:, :vocab_size].float()
            # NaN/inf logits would make argmax pick garbage silently and multinomial fail with a
            # RuntimeError (a device-side assert on CUDA, which no later call survives), so the
            # check comes before the draw: one host sync per token, named
            if not torch.isfinite(next_logits).all():
                raise ValueError(f"the model's logits are not finite (NaN or inf) at new token {step + 1} of "
                                 f"{max_new_tokens} (stream position {state['pos']}): it has diverged")
            if temperature <= 0:
                nxt = next_logits.argmax(-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k:
                    v, _ = torch.topk(next_logits, min(top_k, next_logits.size(-1)))
                    next_logits[next_logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(next_logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            if step + 1 < max_new_tokens:       # the last token's logits would be thrown away
                logits, _, state = self(nxt, state=state)
                logits = logits[:, -1]
        return torch.cat(out, dim=1) if out else last_logits.new_zeros(last_logits.shape[0], 0, dtype=torch.long)

    def kernel_report(self, device) -> list[str]:
        """Which path each memory part's inner loop takes on `device`: one line per distinct
        (part, path) with its number of layers, "fused Triton kernel" or "per-chunk path
        (why not fused)" from the parts' `kernel_paths` (memory.NeuralMemory.
        fused_kernel_blocker, hope.py, cms.py). train.py prints it at start-up; [] for a
        model without memories or fast levels."""
        paths = {}
        for module in self.modules():
            if module is not self and hasattr(module, "kernel_paths"):
                for key in module.kernel_paths(device).items():
                    paths[key] = paths.get(key, 0) + 1
        return [f"{part} x{n}: " + ("fused Triton kernel" if why is None else f"per-chunk path ({why})")
                for (part, why), n in paths.items()]

    def idle_parameters(self, seq_len) -> list[str]:
        """Names of the parameters that no gradient reaches in training on seq_len-token
        sequences (a CMS fast level's W_v when its chunk is not shorter than the sequence:
        cms.CMSLevel.idle_parameters; a Titans memory's gate projection when every gate is a
        constant: titans.LongTermMemory.idle_parameters); [] for most configs. They never
        train, and DDP must be told to expect them (distributed.parallelize); train.py names
        them at start-up."""
        idle = {id(p) for m in self.modules() if m is not self and hasattr(m, "idle_parameters")
                for p in m.idle_parameters(seq_len)}
        return [name for name, p in self.named_parameters() if id(p) in idle]

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T.

        N counts non-embedding parameters plus the LM head, less the memories' meta-learned
        initial fast weights (memory.NeuralMemory.init_weights): no token is multiplied by
        them as by a layer's weights; the reads and writes of the fast weights they start
        are the inner loops of Titans/HOPE memories that `memory_flops_per_token` counts
        (with the CMS fast levels' updates), reported apart. The attention term uses the
        full context (causal masking is not discounted, as in nanoGPT/PaLM).
        """
        from memory import NeuralMemory
        cfg = self.config
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.head.weight.numel()
        n -= sum(p.numel() for m in self.modules() if isinstance(m, NeuralMemory) for p in m.init_weights)
        attn_layers = sum(isinstance(b.mixer, Attention) for b in self.blocks)
        # mixers with their own attention (Titans MAC/MAG/MAL: windows, segments, prefixes;
        # MAC also applies W_qkv to its memory tokens h)
        mixer_attention = sum(b.mixer.attention_flops_per_token(seq_len) for b in self.blocks
                              if hasattr(b.mixer, "attention_flops_per_token"))
        return 6 * n + 12 * attn_layers * cfg.d_model * seq_len + mixer_attention

    def memory_flops_per_token(self, seq_len):
        """Training FLOPs per token of the inner loops that 6N does not see: every block's
        sequence mixer (Titans/HOPE memories: writes, scans, reads) and channel mixer (the CMS
        fast levels' local gradients and updates, HOPE and HOPE-attention); reported
        separately from `flops_per_token`. 0 without memories or fast levels."""
        return sum(part.memory_flops_per_token(seq_len) for b in self.blocks for part in (b.mixer, b.ffn)
                   if hasattr(part, "memory_flops_per_token"))


def state_tensors(state) -> list:
    """Every tensor of a model state (nested dicts, lists and tuples), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return [t for value in values for t in state_tensors(value)]


def _first_in_state(state, fact):
    """fact(tensor) of the first tensor of a model state for which it is not None; None
    without a state or such a tensor."""
    return next((found for t in state_tensors(state) if (found := fact(t)) is not None), None)


def _batch_of(state):
    """The batch size a model state was made for: the first dim of its first tensor of at
    least one dim (None without a state, or a state that holds no such tensor yet)."""
    return _first_in_state(state, lambda t: t.shape[0] if t.dim() else None)


def _precision_of(state):
    """The precision of a model state: the dtype of its first fp32 or fp64 tensor (fast
    weights are kept in the wider of the parameters' dtype and fp32; bf16 KV caches and conv
    buffers, made under autocast, do not tell), or None."""
    return _first_in_state(state, lambda t: t.dtype if t.dtype in (torch.float32, torch.float64) else None)


def build_model(cfg) -> LanguageModel:
    """cfg: a ModelConfig, a full Config, a dict or a YAML path (DESIGN §2)."""
    return LanguageModel(model_config_from(cfg))
