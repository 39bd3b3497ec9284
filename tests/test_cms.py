"""Continuum Memory System (cms.py; NL Eq. 70-71, DESIGN §3.5) against its definition."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from cms import ContinuumMemory, local_objective_grads
from config import CMSConfig, ConfigError, ModelConfig, config_from_dict

D = 8


def make_cms(chunk_sizes, inner_lr=0.05, activation="gelu", seed=0, dtype=torch.float32):
    cfg = ModelConfig(d_model=D, ffn_multiple_of=4,
                      cms=CMSConfig(chunk_sizes=chunk_sizes, hidden_mult=1.5, inner_lr=inner_lr,
                                    activation=activation))
    torch.manual_seed(seed)
    cms = ContinuumMemory(cfg).to(dtype)
    with torch.no_grad():   # non-trivial norm gains, so a test would notice a skipped norm
        for level in cms.levels:
            level.norm.weight.uniform_(0.5, 1.5)
    return cms


def test_call_without_state_starts_fresh_levels_at_pos():
    """A call without state starts fresh fast weights whose chunks align to absolute
    positions from `pos` (model.Block passes its pos): at a multiple of every level's chunk
    the output equals the call at 0, one token off it does not; the state continues there."""
    cms = make_cms([4, 2, None], dtype=torch.float64)
    z = inputs(T=9, dtype=torch.float64)
    y0, _ = cms(z, None, pos=0)
    y8, state = cms(z, None, pos=8)
    y1, _ = cms(z, None, pos=1)
    torch.testing.assert_close(y8, y0, rtol=1e-12, atol=1e-12)
    assert (y1 - y0).abs().max() > 1e-6
    assert [s["pos"] for s in state["levels"] if s] == [17, 17]


def inputs(B=2, T=23, seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=dtype)


def act_fn(name):
    return F.gelu if name == "gelu" else F.silu


def rms(z, weight, eps):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_chain(cms, h):
    """NL Eq. 70-71 token by token, straight from the definition, inner gradients by autograd.

    Returns (output, per-level fast weights at the end as [(w_in, w_out)] per sequence).
    """
    outputs, final = [], []
    for b in range(h.shape[0]):
        z = h[b]                                                       # [T, D]
        out = torch.zeros_like(z)
        seq_final = []
        for level in cms.levels:
            a = rms(z, level.norm.weight, level.norm.eps)
            act = act_fn(level.activation)
            w_in, w_out = level.w_in.weight.detach().clone(), level.w_out.weight.detach().clone()
            if level.chunk_size is None:
                y = act(a @ w_in.T) @ w_out.T
            else:
                target = a @ level.w_target.weight.T
                ys, acc_in, acc_out = [], torch.zeros_like(w_in), torch.zeros_like(w_out)
                for t in range(a.shape[0]):
                    with torch.enable_grad():
                        wi, wo = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
                        y_t = act(a[t] @ wi.T) @ wo.T                  # read with theta_c (chunk start)
                        g_in, g_out = torch.autograd.grad((y_t - target[t].detach()).pow(2).sum(), (wi, wo))
                    ys.append(y_t.detach())
                    acc_in, acc_out = acc_in + g_in, acc_out + g_out
                    if (t + 1) % level.chunk_size == 0:                # end of chunk: one GD step
                        w_in, w_out = w_in - level.inner_lr * acc_in, w_out - level.inner_lr * acc_out
                        acc_in, acc_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
                y = torch.stack(ys)
                seq_final.append((w_in, w_out))
            z = (z + y).detach()
            out = out + y
        outputs.append(out)
        final.append(seq_final)
    return torch.stack(outputs), final


@torch.no_grad()
def test_all_static_equals_stack_of_ffns():
    cms = make_cms([None, None, None])
    h = inputs()
    z = h
    for level in cms.levels:                                           # the reference stack, explicitly
        a = rms(z, level.norm.weight, level.norm.eps)
        z = z + F.linear(F.gelu(F.linear(a, level.w_in.weight)), level.w_out.weight)
    y, state = cms(h)
    torch.testing.assert_close(y, z - h, rtol=1e-5, atol=1e-6)
    assert state == {"levels": [None, None, None]}
    assert all(level.w_target is None for level in cms.levels)       # static levels have no W_v


@torch.no_grad()
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_inner_lr_zero_equals_static(activation):
    fast = make_cms([3, None, 5], inner_lr=0.0, activation=activation)
    static = make_cms([None, None, None], activation=activation)
    static.load_state_dict({k: v for k, v in fast.state_dict().items() if "w_target" not in k})
    h = inputs()
    torch.testing.assert_close(fast(h)[0], static(h)[0], rtol=1e-5, atol=1e-6)
    assert (fast(h)[0] - make_cms([3, None, 5], inner_lr=0.1, activation=activation)(h)[0]).abs().max() > 1e-3


@torch.no_grad()
def test_updates_happen_exactly_at_chunk_boundaries():
    C, lr = 4, 0.1
    fast = make_cms([C], inner_lr=lr)
    static = make_cms([None])
    static.load_state_dict({k: v for k, v in fast.state_dict().items() if "w_target" not in k})
    h = inputs(T=10)
    y_fast, state = fast(h)
    y_static = static(h)[0]
    torch.testing.assert_close(y_fast[:, :C], y_static[:, :C], rtol=1e-5, atol=1e-6)  # chunk 0: theta_0
    assert (y_fast[:, C:2 * C] - y_static[:, C:2 * C]).abs().amin(-1).min() > 0  # every token of chunk 1 differs

    # Fast weights after exactly one chunk == one hand-computed GD step (autograd) on chunk 0.
    level = fast.levels[0]
    _, one_chunk = fast(h[:, :C])
    a = level.norm(h[:, :C])
    target = level.w_target(a)
    for b in range(h.shape[0]):
        w_in = level.w_in.weight.clone().requires_grad_()
        w_out = level.w_out.weight.clone().requires_grad_()
        with torch.enable_grad():
            loss = (F.linear(F.gelu(F.linear(a[b], w_in)), w_out) - target[b]).pow(2).sum()
            g_in, g_out = torch.autograd.grad(loss, (w_in, w_out))
        s = one_chunk["levels"][0]
        torch.testing.assert_close(s["w_in"][b], level.w_in.weight - lr * g_in, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["w_out"][b], level.w_out.weight - lr * g_out, rtol=1e-5, atol=1e-6)
    assert one_chunk["levels"][0]["grad_in"] is None and one_chunk["levels"][0]["pos"] == C
    # After 10 tokens: two updates applied, 2 tokens of chunk 2 accumulated.
    assert state["levels"][0]["pos"] == 10 and state["levels"][0]["grad_in"] is not None


@torch.no_grad()
def test_chain_equals_token_by_token_definition():
    """Three levels (fast, static, fast), T = 23 not a multiple of C, batch of 2, in float64
    so that 1e-10 separates a wrong equation from rounding (in float32 at 1e-4 the levels'
    RMSNorm with eps outside the square root passed)."""
    cms = make_cms([4, None, 3], inner_lr=[0.05, None, 0.08], dtype=torch.float64)
    h = inputs(T=23, dtype=torch.float64)
    y, state = cms(h)
    y_ref, final_ref = reference_chain(cms, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert all(s["w_in"].dtype == torch.float64 for s in state["levels"] if s)    # no float32 detour
    for b in range(h.shape[0]):
        for fast_index, level_index in enumerate([0, 2]):
            s = state["levels"][level_index]
            # The state holds theta_c of the current (partial) chunk: T=23 -> 5 updates for C=4, 7 for C=3.
            torch.testing.assert_close(s["w_in"][b], final_ref[b][fast_index][0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(s["w_out"][b], final_ref[b][fast_index][1], rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_segments_with_carried_state_equal_one_call():
    cms = make_cms([4, None, 3, 5], inner_lr=[0.05, None, 0.08, 0.03])
    h = inputs(T=23)
    y_full, state_full = cms(h)
    state, parts = None, []
    for length in [3, 5, 1, 7, 0, 2, 5]:                                # never aligned to any C
        start = sum(p.shape[1] for p in parts)
        y, state = cms(h[:, start:start + length], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), y_full, rtol=1e-5, atol=1e-6)
    for s, s_full in zip(state["levels"], state_full["levels"]):
        if s_full is None:
            assert s is None
            continue
        assert s["pos"] == s_full["pos"] == 23
        for key in ("w_in", "w_out", "grad_in", "grad_out"):
            torch.testing.assert_close(s[key], s_full[key], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_causality():
    cms = make_cms([4, None, 3], inner_lr=0.1)
    h = inputs(B=1, T=20)
    t = 9
    other = h.clone()
    other[:, t] += 1.0
    a, b = cms(h)[0], cms(other)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3
    assert (a[:, 12:] - b[:, 12:]).abs().amin(-1).min() > 0           # later chunks read the update


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_closed_form_gradient_equals_autograd(activation):
    torch.manual_seed(0)
    B, n, H = 3, 5, 12
    a, target = torch.randn(B, n, D, dtype=torch.float64), torch.randn(B, n, D, dtype=torch.float64)
    w_in = torch.randn(B, H, D, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(B, D, H, dtype=torch.float64, requires_grad=True)
    y, g_in, g_out = local_objective_grads(a, target, w_in, w_out, activation)
    y_auto = torch.matmul(act_fn(activation)(torch.matmul(a, w_in.transpose(1, 2))), w_out.transpose(1, 2))
    ref_in, ref_out = torch.autograd.grad((y_auto - target).pow(2).sum(), (w_in, w_out))
    torch.testing.assert_close(y, y_auto)
    torch.testing.assert_close(g_in, ref_in)
    torch.testing.assert_close(g_out, ref_out)


def test_outer_gradients_flow_through_fast_updates():
    """d(outputs)/d(theta_0, W_v) through the chunked updates == finite differences (float64)."""
    cms = make_cms([3], inner_lr=0.2, dtype=torch.float64)
    level = cms.levels[0]
    h = inputs(B=2, T=7, dtype=torch.float64)
    names = ["levels.0.w_in.weight", "levels.0.w_out.weight", "levels.0.w_target.weight"]
    params = {k: v.detach() for k, v in cms.named_parameters()}

    def outputs(w_in, w_out, w_target):
        return functional_call(cms, {**params, names[0]: w_in, names[1]: w_out, names[2]: w_target}, (h,))[0]

    leaves = tuple(params[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(outputs, leaves, eps=1e-6, atol=1e-6)

    # W_v acts only through the updates: it cannot touch chunk 0 and must reach chunk 1.
    y, _ = cms(h)
    grad_chunk0 = torch.autograd.grad(y[:, :3].sum(), level.w_target.weight, allow_unused=True)[0]
    assert grad_chunk0 is None or grad_chunk0.abs().max() == 0
    y, _ = cms(h)
    assert torch.autograd.grad(y[:, 3:].sum(), level.w_target.weight)[0].abs().max() > 0


def test_outer_gradients_flow_through_the_chain():
    """d(output)/d(h) of a fast, static, fast chain == finite differences (float64): every
    level reads z_{l-1} = h + the outputs of the levels before it (NL Eq. 70), and the
    gradient must pass through both the reads and the fast levels' updates. The token-by-
    token reference above detaches between levels and test_outer_gradients_flow_through_
    fast_updates has one level, so neither sees the chain's backward. Kills: z = z + y.detach()
    (a level's output reaches the next levels' inputs without gradient) and a fast level
    reading z.detach()."""
    cms = make_cms([3, None, 4], inner_lr=[0.2, None, 0.1], dtype=torch.float64)
    h = inputs(B=1, T=7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda h_: cms(h_)[0], (h,), eps=1e-6, atol=1e-6)


@torch.no_grad()
def test_batch_has_per_sequence_fast_weights():
    cms = make_cms([4, None, 3], inner_lr=0.1)
    h = inputs(B=2, T=13)
    y, state = cms(h)
    for b in range(2):
        y_b, state_b = cms(h[b:b + 1])
        torch.testing.assert_close(y[b:b + 1], y_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["levels"][0]["w_in"][b:b + 1], state_b["levels"][0]["w_in"],
                                   rtol=1e-5, atol=1e-6)
    assert (state["levels"][0]["w_in"][0] - state["levels"][0]["w_in"][1]).abs().max() > 0


def test_bad_inputs_have_clear_errors():
    for bad, words in [({"chunk_sizes": []}, "non-empty"), ({"chunk_sizes": [0]}, ">= 1"),
                       ({"chunk_sizes": [4, "x"]}, "integer"), ({"hidden_mult": 0.0}, "hidden_mult"),
                       ({"inner_lr": -1.0}, r"in [0, 1e\+18]"), ({"inner_lr": "fast"}, "inner_lr"),
                       ({"chunk_sizes": [4, None], "inner_lr": [0.1]}, "2 levels"),
                       ({"chunk_sizes": [4, None], "inner_lr": [None, None]}, "inner_lr[0]")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            CMSConfig(**bad)
    cfg = config_from_dict({"model": {"cms": {"chunk_sizes": [4, None], "inner_lr": ["1e-3", None]}}})
    assert cfg.model.cms.level_lrs() == [1e-3, None]
    with pytest.raises(ConfigError, match="activation"):
        config_from_dict({"model": {"cms": {"activation": "relu"}}})
    cms = make_cms([4])
    _, state = cms(inputs(B=2, T=5))
    with pytest.raises(ValueError, match="batch size 2"):
        cms(inputs(B=3, T=5), state)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        cms(torch.randn(5, D))


def relative_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def test_bf16_module_keeps_float32_fast_weights():
    """A CMS cast to bf16 (no autocast) holds its fast weights in float32 (docs/FIDELITY.md):
    its updates theta_c - theta_0 match the float32 module's within bf16 input rounding, where
    bf16 fast weights lose 15-30 % of them at lr 1e-3 (an update is below bf16's resolution
    of the weight). Outputs stay bf16; outputs and the gradients of the input and of every
    parameter match the float32 module's loosely."""
    cms32 = make_cms([4, None, 3], inner_lr=1e-3)
    cms16 = copy.deepcopy(cms32).to(torch.bfloat16)
    h32 = inputs(T=23).requires_grad_()                               # T: not a multiple of 4 or 3
    h16 = h32.detach().bfloat16().requires_grad_()
    (y32, state32), (y16, state16) = cms32(h32), cms16(h16)
    assert y16.dtype == torch.bfloat16 and relative_error(y16, y32) < 0.03
    for index in (0, 2):
        for key in ("w_in", "w_out", "grad_in", "grad_out"):
            assert state16["levels"][index][key].dtype == torch.float32, key
        for key in ("w_in", "w_out"):
            start32 = getattr(cms32.levels[index], key).weight
            start16 = getattr(cms16.levels[index], key).weight.float()
            update32 = state32["levels"][index][key] - start32
            update16 = state16["levels"][index][key] - start16
            assert relative_error(update16, update32) < 0.05, (index, key)
    y32.pow(2).sum().backward()
    y16.float().pow(2).sum().backward()
    assert relative_error(h16.grad, h32.grad) < 0.03
    for (name, p16), p32 in zip(cms16.named_parameters(), cms32.parameters()):
        assert p16.grad.dtype == torch.bfloat16 and relative_error(p16.grad, p32.grad) < 0.03, name


def cms_flops_by_hand(C, hidden, backward=True):
    """One fast level's inner-loop FLOPs per token beyond 6N, from the shapes: per chunk of C
    tokens the local gradient's three matmuls (grad_out = err^T act, grad_pre = err W_out,
    grad_in = grad_pre^T a), each 2 C D hidden, and the update of both weights (a multiply
    and a subtract per entry); x3 with the backward."""
    gradient = 2 * C * D * hidden + 2 * C * D * hidden + 2 * C * hidden * D
    update = 2 * hidden * D + 2 * D * hidden
    return (3 if backward else 1) * (gradient + update) // C


def test_memory_flops_per_token_is_the_hand_count():
    """Levels (C 4, static, C 3) of hidden 12 (1.5 x 8): the two fast levels' hand counts, the
    static level 0 (its FFN is in 6N)."""
    cms = make_cms([4, None, 3])
    hidden = 12
    assert [level.w_in.weight.shape[0] for level in cms.levels] == [hidden] * 3
    assert cms.levels[1].flops_per_token() == 0
    assert cms.levels[0].flops_per_token() == cms_flops_by_hand(4, hidden) == 2016
    assert cms.memory_flops_per_token() == cms_flops_by_hand(4, hidden) + cms_flops_by_hand(3, hidden)
    assert cms.memory_flops_per_token(backward=False) == (cms_flops_by_hand(4, hidden, False)
                                                          + cms_flops_by_hand(3, hidden, False))
    assert make_cms([None, None]).memory_flops_per_token() == 0


def matmul_flops(cms, h):
    """Matmul FLOPs (torch's FlopCounterMode) of a forward and a backward that uses the
    outputs and the whole final state, so every local gradient gets its backward."""
    with FlopCounterMode(display=False) as counter:
        y, state = cms(h)
        loss = y.sum()
        for level_state in state["levels"]:
            if level_state is not None:
                loss = loss + sum(level_state[k].sum() for k in ("w_in", "w_out", "grad_in", "grad_out"))
        loss.backward()
    return counter.get_total_flops()


def test_memory_flops_match_the_counted_matmuls():
    """What a fast chain computes beyond the static chain of the same shapes, less the W_v
    projections (in 6N), is the local gradients' matmuls of the count: forward + backward, T not
    a multiple of C. The update is elementwise: FlopCounterMode does not see it."""
    B, T, hidden = 2, 22, 12
    h = inputs(B=B, T=T)
    fast, static = make_cms([4, None, 3]), make_cms([None, None, None])
    targets = 2 * 6 * D * D                                            # W_v of the two fast levels, 6N
    extra = matmul_flops(fast, h) - matmul_flops(static, h) - B * T * targets
    updates = sum(3 * 4 * hidden * D // C for C in (4, 3))
    assert extra == B * T * (fast.memory_flops_per_token() - updates)


def test_hidden_width_rounds_up_to_ffn_multiple_of():
    """hidden = int(hidden_mult * d_model) rounded UP to model.ffn_multiple_of (CMSConfig,
    model.hidden_width): 1.3 x 8 = 10.4 -> 12 with multiple 4 (rounding down would give 8);
    1.5 x 8 = 12 stays.
    Kills: math.floor in ContinuumMemory.__init__."""
    for mult, hidden in ((1.3, 12), (1.5, 12)):
        cfg = ModelConfig(d_model=D, ffn_multiple_of=4, cms=CMSConfig(chunk_sizes=[4, None], hidden_mult=mult))
        cms = ContinuumMemory(cfg)
        assert [tuple(level.w_in.weight.shape) for level in cms.levels] == [(hidden, D)] * 2, mult


@torch.no_grad()
def test_each_fast_level_steps_with_its_own_inner_lr():
    """inner_lr given per level ([0, None, 0.1]) reaches each level: after one chunk (C = 3)
    the first fast level still holds theta_0 and the third has taken one GD step of size 0.1,
    theta_0 - 0.1 * grad, the gradient by autograd on its own inputs z = h + y_0 + y_1 (the
    chain of NL Eq. 70, written out here with theta_0 for the chunk). The chain reference
    above reads each level's lr from the module, so it cannot see a wrong assignment.
    Kills: the levels' lrs taken from the wrong entry of level_lrs()."""
    cms = make_cms([3, None, 3], inner_lr=[0.0, None, 0.1], dtype=torch.float64)
    h = inputs(B=2, T=3, dtype=torch.float64)
    _, state = cms(h)
    first, static, third = cms.levels
    for key in ("w_in", "w_out"):
        torch.testing.assert_close(state["levels"][0][key], getattr(first, key).weight.expand(2, -1, -1),
                                   rtol=0, atol=0)
    z = h
    for level in (first, static):
        a = rms(z, level.norm.weight, level.norm.eps)
        z = z + F.linear(F.gelu(F.linear(a, level.w_in.weight)), level.w_out.weight)
    a = rms(z, third.norm.weight, third.norm.eps)
    target = F.linear(a, third.w_target.weight)
    for b in range(2):
        w_in = third.w_in.weight.clone().requires_grad_()
        w_out = third.w_out.weight.clone().requires_grad_()
        with torch.enable_grad():
            loss = (F.linear(F.gelu(F.linear(a[b], w_in)), w_out) - target[b]).pow(2).sum()
            g_in, g_out = torch.autograd.grad(loss, (w_in, w_out))
        torch.testing.assert_close(state["levels"][2]["w_in"][b], third.w_in.weight - 0.1 * g_in,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["levels"][2]["w_out"][b], third.w_out.weight - 0.1 * g_out,
                                   rtol=1e-10, atol=1e-12)
        assert (g_in.abs().max() > 1e-3) and (g_out.abs().max() > 1e-3)


@pytest.mark.parametrize("T", [5, 8, 9, 16, 17])
def test_idle_parameters_are_exactly_those_no_gradient_reaches(T):
    """A fast level's W_v gets a gradient only once a chunk completes before the sequence's
    last token: idle_parameters (what DDP is told, and train.py names) lists exactly the
    parameters whose .grad stays None after a training backward. Levels of chunk 8 and 16."""
    from model import build_model
    model = build_model({"arch": "hope", "vocab_size": 32, "n_layer": 1, "n_head": 2, "d_model": 16,
                         "max_seq_len": 32, "cms": {"chunk_sizes": [8, 16, None]}})
    x = torch.randint(0, 32, (2, T + 1))
    model(x[:, :-1], x[:, 1:])[1].backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert model.idle_parameters(T) == no_grad
    assert len(no_grad) == (T <= 8) + (T <= 16)
