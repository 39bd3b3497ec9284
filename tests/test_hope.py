"""HOPE (NL §8; DESIGN §3.5): the self-modifying Titans mixer against a token-by-token
oracle written from the paper's definition, DGD vs GD, streaming, causality, ablations,
in-context recall, and the paper-scale configs' sizes."""
import os

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, HopeConfig, ModelConfig, load_config
from helpers import (apply_memory, assert_cached_generation_matches, assert_streaming_matches, oracle_write,
                     train_recall_accuracy)
from hope import SelfModifyingTitans
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_mixer(seed=0, dtype=torch.float64, d_model=8, n_head=2, **hope):
    torch.manual_seed(seed)
    mixer = SelfModifyingTitans(ModelConfig(d_model=d_model, n_head=n_head, hope=HopeConfig(**hope)))
    return mixer.to(dtype)


# ----------------------------------------------------------------------------------------
# the oracle: NL Eq. 83-90 token by token, inner gradients by autograd

def oracle(mixer, x):
    """The mixer's output computed token by token from its definition (hope.py docstring)."""
    act = F.silu if mixer.memory.activation == "silu" else F.gelu
    B, T, D = x.shape
    H, d = mixer.n_head, mixer.head_dim
    rule = mixer.memory.update_rule
    pre = mixer.w_in(x)

    def initial(memory, slot):
        return [w[slot * H:(slot + 1) * H].unsqueeze(0).expand(B, H, *w.shape[1:]) for w in memory.init_weights]

    names = mixer.projection_names
    current = {name: initial(mixer.projections, i) for i, name in enumerate(names)}
    current["mem"] = initial(mixer.memory, 0)
    start = {}
    outputs = []
    for t in range(T):
        if mixer.conv.width:                   # y_t = sum_j w[K-1-j] x_{t-j} (causal, window K)
            K = mixer.conv.width
            conv = sum(mixer.conv.weight[:, K - 1 - j] * pre[:, t - j] for j in range(min(K, t + 1)))
        else:
            conv = pre[:, t]
        feat = F.silu(conv).view(B, H, d)                                   # x~_t
        if t % mixer.chunk_other == 0:
            start.update({name: list(current[name]) for name in names})
        if t % mixer.chunk_mem == 0:
            start["mem"] = list(current["mem"])
        read = {name: apply_memory(start[name], feat, act) for name in names}
        k = F.normalize(read["k"] if "k" in read else mixer.w_k(feat.reshape(B, D)).view(B, H, d), dim=-1)
        v = read["v"] if "v" in read else mixer.w_v(feat.reshape(B, D)).view(B, H, d)
        q = F.normalize(read["q"] if "q" in read else mixer.w_q(x[:, t]).view(B, H, d), dim=-1)
        if "eta" in read:
            eta = mixer.eta_max * torch.sigmoid((read["eta"] * mixer.eta_weight).sum(-1) + mixer.eta_bias)
        else:
            eta = torch.full((B, H), mixer.inner_lr_fixed, dtype=x.dtype)
        if "alpha" in read:
            alpha = torch.sigmoid((read["alpha"] * mixer.alpha_weight).sum(-1) + mixer.alpha_bias)
        else:
            alpha = torch.ones(B, H, dtype=x.dtype)
        for name in list(names) + ["mem"]:
            target = apply_memory(start[name], v, act)                      # v^ = M_B(v_t), NL Eq. 87
            current[name] = oracle_write(current[name], start[name], k, target, eta, alpha, rule, act,
                                         mixer.memory.max_grad_norm)[0]
        outputs.append(apply_memory(current["mem"], q, act))                # o_t = M_mem,t(q_t)
    o = torch.stack(outputs, 1)                                             # [B, T, H, d]
    return mixer.w_out(mixer.out_norm(o).flatten(2) * F.silu(mixer.w_gate(x)))


ORACLE_CASES = [
    dict(chunk_other=3, chunk_mem=5),                                        # the default HOPE
    dict(chunk_other=4, chunk_mem=3, inner_opt="gd", retention=False, adaptive_k=False,
         adaptive_q=True, activation="gelu", memory_expansion=2, max_grad_norm=None, eta_max=0.1),
    dict(chunk_other=2, chunk_mem=4, adaptive_v=False, inner_lr_fixed=0.3, conv_size=0, eta_max=2.0,
         max_grad_norm=0.5),                                                  # the clip binds
]


@pytest.mark.parametrize("case", range(len(ORACLE_CASES)))
def test_chunked_mixer_equals_token_by_token_definition(case):
    """Outputs and gradients w.r.t. every parameter; T = 13 is a multiple of no chunk size."""
    mixer = make_mixer(**ORACLE_CASES[case])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 8, generator=g, dtype=torch.float64)
    probe = torch.randn(2, 13, 8, generator=g, dtype=torch.float64)
    params = [p for p in mixer.parameters()]
    y, _ = mixer(x)
    y_ref = oracle(mixer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad((y * probe).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), params)
    for (name, _), a, b in zip(mixer.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")
    assert all(gr.abs().max() > 0 for gr in grads)                         # everything is learned


# ----------------------------------------------------------------------------------------
# DGD vs GD on one memory

def test_dgd_and_gd_differ_and_both_reduce_the_inner_loss():
    """HOPE's M_mem trained on a fixed stream of (k, v^) pairs (8 pairs, each seen 6 times):
    both inner optimisers fit the pairs, and DGD's k k^T term makes a different learner."""
    g = torch.Generator().manual_seed(3)
    d = 8
    keys = F.normalize(torch.randn(8, d, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.tanh(keys @ torch.randn(d, d, generator=g, dtype=torch.float64))
    order = torch.cat([torch.randperm(8, generator=g) for _ in range(6)])
    k = keys[order].view(1, -1, 1, d)
    v = targets[order].view(1, -1, 1, d)
    lr = torch.full(k.shape[:3], 0.3, dtype=torch.float64)
    alpha = torch.ones_like(lr)
    results = {}
    for rule in ("dgd", "gd"):
        memory = make_mixer(d_model=d, n_head=1, inner_opt=rule, chunk_mem=4, memory_expansion=2).memory
        y, state = memory(k, k, v, lr, alpha)
        fit = lambda weights: (memory.read(weights, keys.view(1, 8, 1, d)) - targets.view(1, 8, 1, d)).pow(2).sum().item()
        before, after = fit(memory.initial_state(1)["weights"]), fit(state["weights"])
        assert after < 0.25 * before, (rule, before, after)
        results[rule] = (y, after)
    assert (results["dgd"][0] - results["gd"][0]).abs().max() > 1e-2


def test_clipped_inner_gradient_is_differentiable_where_it_is_zero():
    """memory.py's max_grad_norm at a token whose inner gradient is exactly 0 (its target
    is the memory's own prediction; in a model: an underflowed SiLU): the outer gradient
    must stay finite (a sqrt of the squared norm has a 0/0 backward there)."""
    memory = make_mixer(d_model=4, n_head=1, max_grad_norm=1.0).memory
    k = F.normalize(torch.randn(1, 3, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)), dim=-1)
    k.requires_grad_()
    v = memory.read(memory.initial_state(1)["weights"], k).detach()          # l_t = 0 exactly
    lr = torch.full((1, 3, 1), 0.5, dtype=torch.float64)
    y, _ = memory(k, k, v, lr, torch.ones_like(lr))
    y.sum().backward()
    assert torch.isfinite(k.grad).all() and all(torch.isfinite(w.grad).all() for w in memory.init_weights)


# ----------------------------------------------------------------------------------------
# streaming, generation, causality

def test_segments_with_carried_state_equal_one_call():
    """Odd segment lengths that cut both chunk sizes (3 and 5) everywhere, single tokens included."""
    mixer = make_mixer(chunk_other=3, chunk_mem=5, adaptive_q=True)
    x = torch.randn(2, 23, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full, full_state = mixer(x)
    state, parts, pos = None, [], 0
    for length in (1, 4, 2, 7, 1, 8):
        y, state = mixer(x[:, pos:pos + length], state, pos=pos)
        parts.append(y)
        pos += length
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    for a, b in zip(state["memory"]["weights"] + state["projections"]["weights"],
                    full_state["memory"]["weights"] + full_state["projections"]["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["conv"], full_state["conv"])


def tiny_model(arch="hope", seed=0, **hope):
    torch.manual_seed(seed)
    hope = {"chunk_other": 3, "chunk_mem": 5, **hope}
    cfg = {"arch": arch, "vocab_size": 53, "n_layer": 2, "n_head": 2, "d_model": 16, "hope": hope,
           "cms": {"chunk_sizes": [4, None], "inner_lr": 0.1}}
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", ["hope", "hope_attention"])
def test_model_streaming_and_generation(arch):
    m = tiny_model(arch)
    idx = torch.randint(0, 53, (2, 19), generator=torch.Generator().manual_seed(5))
    assert_streaming_matches(m, idx, [(0, 7), (7, 8), (8, 13), (13, 19)], 1e-5)
    assert_cached_generation_matches(m, idx[:, :6], 9)


def test_conv_size_has_the_titans_meaning():
    """model.hope.conv_size and model.titans.conv_size mean the same: 0 = no conv, w >= 1 a
    causal depthwise conv of width w (1: a learned per-channel scale, which still streams
    exactly). Kills HOPE treating 1 as off, as it once did while Titans did not."""
    for conv_size, width in ((0, None), (1, 1), (4, 4)):
        hope_conv = tiny_model(conv_size=conv_size).blocks[0].mixer.conv
        torch.manual_seed(0)
        titans = build_model({"arch": "titans", "vocab_size": 53, "n_layer": 1, "n_head": 2, "d_model": 16,
                              "titans": {"conv_size": conv_size}})
        titans_width = titans.blocks[0].mixer.memory.conv_k.width
        assert (hope_conv.width or None) == width == (titans_width or None)
    m = tiny_model(conv_size=1)
    idx = torch.randint(0, 53, (2, 19), generator=torch.Generator().manual_seed(5))
    assert_streaming_matches(m, idx, [(0, 7), (7, 8), (8, 13), (13, 19)], 1e-5)


def test_causality():
    """Changing token t leaves every earlier output unchanged and changes later ones."""
    mixer = make_mixer(chunk_other=3, chunk_mem=5, adaptive_q=True)
    x = torch.randn(1, 17, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    other = x.clone()
    other[:, 9] += 1.0
    a, b = mixer(x)[0], mixer(other)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().amin(-1).min() > 0           # every later token sees it
    m = tiny_model()
    idx = torch.randint(0, 53, (1, 17), generator=torch.Generator().manual_seed(7))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 53
    la, lb = m(idx)[0], m(changed)[0]
    torch.testing.assert_close(la[:, :9], lb[:, :9], rtol=0, atol=0)
    assert (la[:, 9:] - lb[:, 9:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------
# ablations (NL Table 6)

ABLATIONS = {
    "inner_opt=gd": dict(inner_opt="gd"),
    "retention=false": dict(retention=False),
    "adaptive_k=false": dict(adaptive_k=False),
    "adaptive_v=false": dict(adaptive_v=False),
    "adaptive_q=true": dict(adaptive_q=True),
    "inner_lr_fixed=0": dict(inner_lr_fixed=0.0),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_switches_build_and_change_the_output(name):
    """Each switch changes the computation, not just the random init: the parameters the
    two mixers share are copied from the default one."""
    base = make_mixer(chunk_other=3, chunk_mem=5)
    ablated = make_mixer(chunk_other=3, chunk_mem=5, seed=1, **ABLATIONS[name])
    shared = {n: p for n, p in base.named_parameters()}
    with torch.no_grad():
        for n, p in ablated.named_parameters():
            if n in shared and shared[n].shape == p.shape:
                p.copy_(shared[n])
    expected = {"inner_opt=gd": ("k", "v", "eta", "alpha"), "retention=false": ("k", "v", "eta"),
                "adaptive_k=false": ("v", "eta", "alpha"), "adaptive_v=false": ("k", "eta", "alpha"),
                "adaptive_q=true": ("k", "v", "q", "eta", "alpha"), "inner_lr_fixed=0": ("k", "v", "alpha")}
    assert ablated.projection_names == expected[name]
    assert (ablated.w_k is None) == ablated.adaptive_k and (ablated.w_q is None) == ablated.adaptive_q
    x = torch.randn(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y_base, y_ablated = base(x)[0], ablated(x)[0]
    assert torch.isfinite(y_ablated).all()
    assert (y_base - y_ablated).abs().max() > 1e-3


def test_cms_switch_and_hope_attention_blocks():
    from cms import ContinuumMemory
    from model import Attention, SwiGLU
    from test_model import _rms_norm
    m = tiny_model()
    assert isinstance(m.blocks[0].mixer, SelfModifyingTitans) and isinstance(m.blocks[0].ffn, ContinuumMemory)
    assert isinstance(tiny_model(cms=False).blocks[0].ffn, SwiGLU)
    # Table 6 "w/o CMS", in float64: Block(x) = h + W_down (SiLU(W_gate a) * W_up a), a =
    # RMSNorm_2 h, with h = x + SMT(RMSNorm_1 x) from the block's own mixer (the mixer is
    # checked by equation above). Random norm gains and O(1) FFN weights, so that a swapped
    # gate/up, a missing norm or residual, or the FFN reading x shows.
    block = tiny_model(cms=False).blocks[0].double()
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for norm in (block.mixer_norm, block.ffn_norm):
            norm.weight.uniform_(0.5, 1.5, generator=g)
        for w in (block.ffn.w_gate.weight, block.ffn.w_up.weight, block.ffn.w_down.weight):
            w.normal_(0.0, w.shape[1] ** -0.5, generator=g)
        x = torch.randn(2, 13, 16, generator=g, dtype=torch.float64)
        y, _ = block(x)
        h = x + block.mixer(_rms_norm(x, block.mixer_norm.weight, block.mixer_norm.eps))[0]
        a = _rms_norm(h, block.ffn_norm.weight, block.ffn_norm.eps)
        gate, up = a @ block.ffn.w_gate.weight.T, a @ block.ffn.w_up.weight.T
        expected = h + (gate * torch.sigmoid(gate) * up) @ block.ffn.w_down.weight.T
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert (expected - h).norm() > 1e-3 and (h - x).norm() > 1e-3                 # both terms count
    attention = tiny_model("hope_attention")
    assert isinstance(attention.blocks[0].mixer, Attention) and isinstance(attention.blocks[0].ffn, ContinuumMemory)
    # HOPE-attention counts only its CMS fast level (model.py sums mixers and CMS)
    assert m.memory_flops_per_token(64) > attention.memory_flops_per_token(64) > 0


def test_hope_block_is_mixer_then_cms_with_pre_norm_residuals():
    """NL Eq. 94-97 as one block, in float64: Block(x) = h + CMS(RMSNorm_2 h) with
    h = x + SMT(RMSNorm_1 x), the norms written out here (x / sqrt(mean x^2 + eps) * g, with
    random gains), SMT the token-by-token oracle above and CMS the block's own ffn. T = 13
    crosses every chunk (C_other 3, C_mem 5, CMS 4). Kills: post-norm, a missing residual,
    the CMS reading x instead of h, or swapped norms."""
    block = tiny_model().blocks[0].double()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for norm in (block.mixer_norm, block.ffn_norm):
            norm.weight.copy_(0.5 + torch.rand(16, generator=g, dtype=torch.float64))
    x = torch.randn(2, 13, 16, generator=g, dtype=torch.float64)

    def rms_norm(z, norm):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    y, _ = block(x)                                  # (the oracle's inner gradients use autograd)
    h = x + oracle(block.mixer, rms_norm(x, block.mixer_norm))
    expected = h + block.ffn(rms_norm(h, block.ffn_norm))[0]
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert (expected - h).abs().max() > 1e-3 and (h - x).abs().max() > 1e-3      # both terms count


def test_hope_attention_block_is_attention_then_cms_with_pre_norm_residuals():
    """§8.3's HOPE-attention block in float64, all written out: Block(x) = h + CMS(RMSNorm_2 h)
    with h = x + W_o softmax(RoPE(q) RoPE(k)^T / sqrt(d) + causal mask) v, (q, k, v) = W_qkv
    RMSNorm_1 x; the norms and RoPE as in tests/test_model.py's Transformer++ equations
    and the CMS chain as tests/test_cms.py's token-by-token definition. O(1) attention
    weights (attention far from uniform), random norm gains, eps and RoPE base large enough
    to see; T = 13 crosses the CMS fast level's chunks (4). Kills: post-norm, a missing
    residual, the CMS reading x instead of h, swapped norms, RoPE or the mask left out."""
    from test_cms import reference_chain
    from test_model import _rms_norm, _rotate
    torch.manual_seed(0)
    m = build_model({"arch": "hope_attention", "vocab_size": 53, "n_layer": 1, "n_head": 2, "d_model": 16,
                     "norm_eps": 0.05, "rope_theta": 50.0, "cms": {"chunk_sizes": [4, None], "inner_lr": 0.1}})
    block = m.blocks[0].double()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for norm in (block.mixer_norm, block.ffn_norm):
            norm.weight.uniform_(0.5, 1.5, generator=g)
        for w in (block.mixer.wqkv.weight, block.mixer.wo.weight):
            w.normal_(0.0, w.shape[1] ** -0.5, generator=g)
    x = torch.randn(2, 13, 16, generator=g, dtype=torch.float64)
    T, H, D = 13, 2, 8
    pos = torch.arange(T)
    with torch.no_grad():
        y, _ = block(x)
        attention = []
        for seq in x:
            q, k, v = (_rms_norm(seq, block.mixer_norm.weight, 0.05) @ w.T
                       for w in block.mixer.wqkv.weight.chunk(3, dim=0))
            q, k, v = q.view(T, H, D), k.view(T, H, D), v.view(T, H, D)
            q, k = _rotate(q, pos, 50.0), _rotate(k, pos, 50.0)
            scores = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
            scores = scores.masked_fill(pos[None, :, None] < pos[None, None, :], float("-inf"))
            heads = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * D)
            attention.append(heads @ block.mixer.wo.weight.T)
    h = x + torch.stack(attention)
    expected = h + reference_chain(block.ffn, _rms_norm(h, block.ffn_norm.weight, 0.05))[0]
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert (expected - h).norm() > 1e-3 and (h - x).norm() > 1e-3                 # both terms count


# ----------------------------------------------------------------------------------------
# configs and errors

def test_default_job_is_a_hope_whose_sequences_complete_memory_and_cms_chunks():
    """The default job trains HOPE (issue 4), and every chunk size divides the sequence, so
    each training sequence updates M_mem and the CMS fast level (their outer parameters get
    gradients) and no chunk is cut short."""
    cfg = load_config(os.path.join(ROOT, "configs/quickstart.yaml"))
    assert cfg.model.arch == "hope" and cfg.data.tokenizer == "bytes"
    chunks = [cfg.model.hope.chunk_other, cfg.model.hope.chunk_mem] + [c for c in cfg.model.cms.chunk_sizes if c]
    assert all(cfg.train.seq_len % c == 0 and c < cfg.train.seq_len for c in chunks)


def test_bad_config_and_inputs_raise_clear_errors():
    for bad in (dict(chunk_mem=0), dict(chunk_other=1.5), dict(memory_expansion=0), dict(conv_size=-1),
                dict(eta_max=0.0), dict(inner_lr_fixed=-1.0), dict(max_grad_norm=0.0)):
        with pytest.raises(ConfigError, match="model.hope"):
            HopeConfig(**bad)
    with pytest.raises(ConfigError, match="model.hope.inner_opt"):
        load_config(None, ["--model.hope.inner_opt=adam"])
    mixer = make_mixer()
    with pytest.raises(ValueError, match="expects"):
        mixer(torch.zeros(2, 5, 7, dtype=torch.float64))
    _, state = mixer(torch.zeros(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="position"):
        mixer(torch.zeros(2, 1, 8, dtype=torch.float64), state, pos=3)
    with pytest.raises(ValueError, match="batch size"):
        mixer(torch.zeros(3, 1, 8, dtype=torch.float64), state, pos=5)


def test_call_without_state_starts_fresh_memories_at_pos():
    """A call without state starts fresh memories whose chunks align to absolute positions
    from `pos`: at a common multiple of C_other and C_mem (here 4) the output equals the call
    at 0 (HOPE has no positional encoding), one token off a boundary it does not, and the
    state continues from pos + T."""
    mixer = make_mixer(chunk_other=2, chunk_mem=4)
    x = torch.randn(1, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y0, _ = mixer(x, None, pos=0)
    y8, state = mixer(x, None, pos=8)
    y1, _ = mixer(x, None, pos=1)
    torch.testing.assert_close(y8, y0, rtol=1e-12, atol=1e-12)
    assert (y1 - y0).abs().max() > 1e-6
    assert state["pos"] == state["memory"]["pos"] == state["projections"]["pos"] == 15


# ----------------------------------------------------------------------------------------
# in-context recall: the inner learning is what recalls

N_KEYS, N_VALUES, N_PAIRS, N_QUERIES, GAP = 8, 8, 3, 2, 3
SEP, QUERY0 = N_KEYS * N_VALUES, N_KEYS * N_VALUES + 1
VALUE0 = QUERY0 + N_KEYS


def recall_batch(batch_size, gen):
    """Three pair tokens (key i, value j) -> id i * 8 + j, with distinct keys; three
    separators; then two query tokens (a key, id QUERY0 + i), whose label is the value
    stored with that key (id VALUE0 + j). The separators keep every pair outside the conv
    window of the first query. Chance is 1/8."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:N_PAIRS] for _ in range(batch_size)])
    values = torch.randint(0, N_VALUES, (batch_size, N_PAIRS), generator=gen)
    which = torch.stack([torch.randperm(N_PAIRS, generator=gen)[:N_QUERIES] for _ in range(batch_size)])
    idx = torch.cat([keys * N_VALUES + values, torch.full((batch_size, GAP), SEP),
                     QUERY0 + keys.gather(1, which)], 1)
    labels = torch.full_like(idx, -1)
    labels[:, N_PAIRS + GAP:] = VALUE0 + values.gather(1, which)
    return idx, labels


def recall_config(frozen):
    """A one-layer HOPE (d 64, one head, one chunk: the writes are made at the meta-learned
    initial weights and read token by token after the write). frozen: every inner learning
    rate fixed at 0 (memories and CMS keep their meta init: no writes) and no retention: the
    data-dependent decay alpha_t of W_t = alpha_t W_{t-1}, computed from the conv features,
    which see the pairs, is itself a path for context (a scalar per head and token; a frozen
    model with retention learns 22 % on this task through it in 500 steps)."""
    hope = {"chunk_other": 8, "chunk_mem": 8}
    if frozen:
        hope.update(inner_lr_fixed=0.0, retention=False)
    return {"arch": "hope", "vocab_size": VALUE0 + N_VALUES, "n_layer": 1, "n_head": 1, "d_model": 64,
            "hope": hope, "cms": {"chunk_sizes": [4, None], "inner_lr": 0.0 if frozen else 1e-3}}


def test_frozen_recall_model_cannot_see_the_pairs():
    """Frozen, the logits at the queries are a function of the query tokens alone: changing
    every stored value changes nothing there, so its recall is chance (1/8) by construction.
    With the inner learning on, they change."""
    idx = recall_batch(4, torch.Generator().manual_seed(3))[0]
    other = idx.clone()
    other[:, :N_PAIRS] = (other[:, :N_PAIRS] // N_VALUES) * N_VALUES + (other[:, :N_PAIRS] + 1) % N_VALUES
    query = slice(N_PAIRS + GAP, None)
    for frozen in (True, False):
        torch.manual_seed(0)
        model = build_model(recall_config(frozen))
        with torch.no_grad():
            diff = (model(idx)[0][:, query] - model(other)[0][:, query]).abs().max().item()
        assert (diff == 0) if frozen else (diff > 1e-4), (frozen, diff)


@pytest.mark.slow
def test_in_context_recall_needs_the_inner_learning():
    """Tiny HOPE learns to recall values stored 3-8 tokens before the query: 500 AdamW steps
    (3e-3, clipping 1.0, as train.py) of 32 sequences: 99.5 % here, 64-100 % over seeds 0-5
    (at 250 steps 37-96 %). Frozen it stays at chance (the test above)."""
    torch.manual_seed(0)
    learned = train_recall_accuracy(build_model(recall_config(False)), recall_batch, 500,
                                    batch_size=32, eval_size=512, seed=0)
    assert learned > 0.5, learned


@pytest.mark.parametrize("config", ["hope_340m", "hope_760m", "hope_1.3b"])
@pytest.mark.slow
def test_outer_gradients_stay_finite_over_long_sequences(config):
    """The paper configs' memories (chunks 16 / 64, CMS 512; width cut to 2 layers of 2 heads
    of 64) at init on 2048 random tokens: with their clip of every write's inner gradient
    (1.0) the outer gradient norm is ~1. Clipped at 3, the default, it is ~4e7 (on text ~1e13
    here, inf at 4096 tokens: train.py would skip every step; docs/FIDELITY.md, HOPE choice 12)."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yaml"),
                      ["--model.n_layer=2", "--model.d_model=128", "--model.n_head=2", "--model.vocab_size=256"]).model
    x = torch.randint(0, 256, (1, 2049), generator=torch.Generator().manual_seed(0))

    def outer_gradient_norm(max_grad_norm):
        cfg.hope.max_grad_norm = max_grad_norm
        torch.manual_seed(0)
        model = build_model(cfg)
        model(x[:, :-1], x[:, 1:])[1].backward()
        return torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert outer_gradient_norm(cfg.hope.max_grad_norm) < 50
    if config == "hope_760m":
        assert not outer_gradient_norm(HopeConfig().max_grad_norm) < 1e6


@pytest.mark.parametrize("arch", ["titans", "hope", "hope_attention"])
def test_bf16_parameters_under_autocast(arch):
    """FSDP2's bf16 mixed precision hands the blocks bf16 weights while the memories keep
    fp32 fast weights and gates; train.py runs that under autocast (found on an H100: without
    it the gate einsum met Float and BFloat16). Forward and backward stay finite."""
    torch.manual_seed(0)
    model = build_model({"arch": arch, "vocab_size": 64, "d_model": 32, "n_layer": 2, "n_head": 2}).to(torch.bfloat16)
    x = torch.randint(0, 64, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, _ = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("hope", [{}, dict(adaptive_k=False, adaptive_v=False, adaptive_q=True)])
def test_bf16_model_without_autocast_matches_float32(hope):
    """`model.to(torch.bfloat16)` runs forward and backward with no autocast: the mixer
    casts at its boundaries (the gates are formed in the fp32 memory reads' dtype, the
    readout goes back to the model's dtype) while the memories compute in fp32. Logits and
    loss are close to the fp32 model's (bf16 rounding: logit error std ~1.5 % of the logits'
    std here; switching the mixers off moves them by ~120 %), every gradient finite."""
    model = tiny_model(**hope).train()
    idx = torch.randint(0, 53, (2, 17), generator=torch.Generator().manual_seed(9))
    logits32, loss32, _ = model(idx[:, :-1], idx[:, 1:])
    model.to(torch.bfloat16)
    logits, loss, _ = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert (logits.float() - logits32).std() < 0.05 * logits32.std()
    assert abs(loss.item() - loss32.item()) < 0.01 * loss32.item(), (loss.item(), loss32.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_a_fixed_inner_lr_reaches_the_memories_unrounded_in_a_bf16_model():
    """inner_lr_fixed with a static k (adaptive_k: false) in a bf16 model: eta was made in k's
    dtype, so the constant 0.3 reached every memory as bf16's 0.30078."""
    mixer = make_mixer(dtype=torch.bfloat16, chunk_other=3, chunk_mem=5, adaptive_k=False, inner_lr_fixed=0.3)
    seen, scan = [], mixer.memory.scan
    mixer.memory.scan = lambda q, k, v, lr, *a, **kw: seen.append(lr) or scan(q, k, v, lr, *a, **kw)
    mixer(torch.randn(1, 4, 8, dtype=torch.bfloat16))
    assert seen[0].dtype == torch.float32 and torch.all(seen[0] == 0.3)


def test_memory_settings_reach_both_memories():
    """Every model.hope memory setting reaches both NeuralMemories, the stacked projection
    memories (chunk C_other, n_memories x H heads) and M_mem (chunk C_mem): the oracle test
    reads them back from the modules, so it cannot see a setting that is dropped. Kills:
    detach_targets or detach_chunks_older_than (or any other) not passed on in
    SelfModifyingTitans.__init__."""
    mixer = make_mixer(chunk_other=3, chunk_mem=5, inner_opt="gd", activation="gelu", memory_expansion=2,
                       max_grad_norm=0.7, detach_targets=True, detach_chunks_older_than=2)
    assert mixer.projection_names == ("k", "v", "eta", "alpha")
    for mem, chunk, heads in ((mixer.projections, 3, 4 * 2), (mixer.memory, 5, 2)):
        got = (mem.n_head, mem.head_dim, mem.depth, mem.hidden_dim, mem.activation, mem.chunk_size,
               mem.update_rule, mem.max_grad_norm, mem.detach_targets, mem.detach_chunks_older_than)
        assert got == (heads, 4, 2, 8, "gelu", chunk, "gd", 0.7, True, 2)


def test_initialisation_survives_build_model():
    """hope.py's init after build_model (which draws every Linear from N(0, 0.02), then calls
    reset_memory_parameters): W_in ~ N(0, 9 / D) so x~ has O(1) entries, W_g ~ N(0, 4 / D) (an
    O(1) output gate), eta bias 0 (eta_t starts near eta_max / 2), alpha bias 4 (alpha_t near
    sigmoid(4) = 0.982: slow forgetting), the gate vectors N(0, 1 / d). D = 64: 4096 samples
    per matrix, a relative std error of ~1 %. Kills: a changed W_IN_STD, GATE_STD or
    ALPHA_BIAS_INIT (each survives every other non-training test)."""
    torch.manual_seed(0)
    model = build_model({"arch": "hope", "vocab_size": 53, "n_layer": 1, "n_head": 2, "d_model": 64})
    mixer = model.blocks[0].mixer
    for weight, std in ((mixer.w_in.weight, 3.0 / 8), (mixer.w_gate.weight, 2.0 / 8)):
        assert abs(weight.std().item() / std - 1) < 0.05 and abs(weight.mean().item()) < 0.1 * std
    assert torch.equal(mixer.eta_bias, torch.zeros(2)) and torch.equal(mixer.alpha_bias, torch.full((2,), 4.0))
    for vector in (mixer.eta_weight, mixer.alpha_weight):                    # [H, d], d = 32
        assert abs(vector.std().item() * 32 ** 0.5 - 1) < 0.2


def test_memory_flops_count_every_memory_read():
    """memory_flops_per_token beyond the memories' own inner loops (NeuralMemory.flops_per_token)
    is the reads, counted by hand: per token and head one M(x) is two d x E matmuls,
    2 * 2 * d * E = 64 FLOPs at d = E = 4; M_mem reads its target M_mem,B(v) (1 read), and
    each of the n = 4 projection memories reads x~ and its target M_B(v) (8 reads): 9 reads
    x 2 heads x 64 = 1152 forward, x3 with the backward. Kills: a dropped read in the count."""
    mixer = make_mixer()                                      # d_model 8, 2 heads, expansion 1
    assert mixer.projection_names == ("k", "v", "eta", "alpha")
    for backward, factor in ((True, 3), (False, 1)):
        inner = mixer.memory.flops_per_token(backward) + mixer.projections.flops_per_token(backward)
        assert mixer.memory_flops_per_token(64, backward) - inner == factor * 9 * 2 * 64
