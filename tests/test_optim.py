"""Deep optimisers (optim.py): toy problems, NL Fig. 4, Newton-Schulz, resume, tiny LM, DTensor.

Run as a script under torchrun (2 ranks) this file is also the DTensor worker of
test_dtensor_shards_match_single_process.
"""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from optim import (DMGD, M3, OPTIMIZERS, DeltaMomentum, Muon, PreconditionedMomentum, build_optimizer,
                   newton_schulz, optimizer_options, split_param_groups)

DEEP = [name for name in OPTIMIZERS if name != "adamw"]
NEEDS_MATRICES = {"muon", "m3"}
# small-problem settings: M3's slow level every 2 steps so that short runs exercise it
TEST_OPTIONS = {"m3": {"frequency": 2}}


def make(name, groups, lr=1e-2, weight_decay=0.0, **extra):
    return build_optimizer(name, groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8,
                           **{**TEST_OPTIONS.get(name, {}), **extra})


class Regression(nn.Module):
    """y = emb[id] @ W^T + b: a matrix (deep rule), an embedding and a vector (AdamW)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.1)
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, ids):
        return self.embed(ids) @ self.weight.T + self.bias


def regression_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (64,), generator=g)
    target = torch.randn(10, 8, generator=g)[ids]
    return ids, target


# ----------------------------------------------------------------------------------------
# Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 32), (24, 40), (3, 16, 24)])
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(*shape, generator=g) * 5.0
    out = newton_schulz(matrix, steps=5)
    assert out.shape == matrix.shape and out.dtype == matrix.dtype
    singular = torch.linalg.svdvals(out)
    # the quintic iteration trades exactness for speed: singular values land in ~[0.7, 1.2]
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    # and it keeps the singular vectors: out ~ U V^T of the input
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    cosine = (out * (u @ vh)).sum(dim=(-2, -1)) / (out.norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1)))
    assert (cosine > 0.98).all(), cosine


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="needs a matrix"):
        newton_schulz(torch.randn(5))


# ----------------------------------------------------------------------------------------
# each optimiser learns; reductions to simpler rules

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_reduces_regression_loss(name):
    torch.manual_seed(0)
    model = Regression()
    ids, target = regression_problem()
    opt = make(name, split_param_groups(model, weight_decay=0.0), lr=3e-2)
    first = None
    for _ in range(60):
        loss = (model(ids) - target).square().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (model(ids) - target).square().mean().item()
    assert final < 0.2 * first, (name, first, final)


@pytest.mark.parametrize("name", DEEP)
def test_adamw_groups_match_torch_adamw(name):
    """use_muon=False groups are exactly torch.optim.AdamW (decoupled weight decay included)."""
    torch.manual_seed(0)
    ours_model = Regression()
    ref_model = copy.deepcopy(ours_model)
    ours = make(name, [{"params": list(ours_model.parameters()), "use_muon": False}], weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids, target = regression_problem()
    for _ in range(5):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            (model(ids) - target).square().mean().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DEEP)
def test_weight_decay_is_decoupled(name):
    """With zero gradients every rule's update is 0 and only p <- p (1 - lr wd) remains."""
    p = nn.Parameter(torch.randn(6, 5))
    start = p.detach().clone()
    opt = make(name, [p], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(p.detach(), start * (1 - 0.1 * 0.5) ** 3)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def test_delta_momentum_without_delta_is_ema_momentum():
    p = nn.Parameter(torch.randn(4, 3))
    expected, m = p.detach().clone(), torch.zeros(4, 3)
    opt = DeltaMomentum([p], lr=0.1, momentum=0.8, delta_strength=0.0, preconditioner="none")
    for g in _grads((4, 3), 4):
        p.grad = g
        opt.step()
        m = 0.8 * m + 0.2 * g
        expected -= 0.1 * m
    torch.testing.assert_close(p.detach(), expected)


def test_delta_momentum_erases_along_the_gradient():
    """One step of NL Eq. 49 by hand: m (b I - e g^T g) + (1 - b) g, e = s / (1 + s ||g||^2)."""
    p = nn.Parameter(torch.zeros(3, 4))
    opt = DeltaMomentum([p], lr=1.0, momentum=0.9, delta_strength=2.0, preconditioner="none")
    g1, g2 = _grads((3, 4), 2)
    p.grad = g1
    opt.step()
    m1 = 0.1 * g1
    e = 2.0 / (1 + 2.0 * g2.square().sum())
    m2 = m1 @ (0.9 * torch.eye(4) - e * g2.T @ g2) + 0.1 * g2
    p.grad = g2
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m2)
    torch.testing.assert_close(p.detach(), -(m1 + m2))
    # vectors: the elementwise (diagonal) form
    v = nn.Parameter(torch.zeros(5))
    opt = DeltaMomentum([v], lr=1.0, momentum=0.9, delta_strength=2.0, preconditioner="none")
    h1, h2 = _grads((5,), 2)
    for h in (h1, h2):
        v.grad = h
        opt.step()
    torch.testing.assert_close(opt.state[v]["momentum_buffer"],
                               0.1 * h1 * (0.9 - 2.0 * h2 ** 2 / (1 + 2.0 * h2 ** 2)) + 0.1 * h2)


def test_preconditioned_momentum_by_hand():
    p = nn.Parameter(torch.randn(5))
    expected, m, v = p.detach().clone(), torch.zeros(5), torch.zeros(5)
    opt = PreconditionedMomentum([p], lr=0.1, betas=(0.8, 0.9), eps=1e-8)
    for t, g in enumerate(_grads((5,), 4), start=1):
        p.grad = g
        opt.step()
        v = 0.9 * v + 0.1 * g * g
        m = 0.8 * m + 0.2 * g / ((v / (1 - 0.9 ** t)).sqrt() + 1e-8)
        expected -= 0.1 * m / (1 - 0.8 ** t)
    torch.testing.assert_close(p.detach(), expected)


def test_dmgd_without_inner_learning_is_normalised_momentum():
    """inner_lr = 0 freezes the MLP at its zero output: the memory is the linear momentum b."""
    p = nn.Parameter(torch.randn(4, 6))
    expected, b = p.detach().clone(), torch.zeros(4, 6)
    opt = DMGD([p], lr=0.1, momentum=0.9, inner_lr=0.0)
    for g in _grads((4, 6), 4):
        p.grad = g
        opt.step()
        b = 0.9 * b - 0.1 * g / (g.square().mean().sqrt() + 1e-8)
        expected += 0.1 * b
    torch.testing.assert_close(p.detach(), expected)
    assert opt.state[p]["mlp_out"].abs().sum() == 0


def test_dmgd_memory_learns():
    """With inner_lr > 0 the MLP part of the memory moves and changes the update."""
    p, q = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    q.data.copy_(p.data)
    learning, frozen = DMGD([p], lr=0.1, inner_lr=0.5), DMGD([q], lr=0.1, inner_lr=0.0)
    for g in _grads((4, 6), 3):
        p.grad, q.grad = g, g.clone()
        learning.step()
        frozen.step()
    assert learning.state[p]["mlp_out"].abs().sum() > 0
    assert not torch.allclose(p, q)


def test_dmgd_resumes_with_bf16_parameters():
    """torch's load_state_dict casts every state tensor to its parameter's dtype: with bf16
    parameters the MLP memory came back bf16 and the next step stopped at a dtype mismatch.
    It comes back fp32, as saved, and the resumed run equals the uninterrupted one."""
    p, q = nn.Parameter(torch.randn(4, 6).bfloat16()), nn.Parameter(torch.zeros(4, 6).bfloat16())
    q.data.copy_(p.data)
    grads = [g.bfloat16() for g in _grads((4, 6), 4)]
    straight = DMGD([p], lr=0.1, inner_lr=0.5)
    for g in grads:
        p.grad = g.clone()
        straight.step()
    first = DMGD([q], lr=0.1, inner_lr=0.5)
    for g in grads[:2]:
        q.grad = g.clone()
        first.step()
    resumed = DMGD([q], lr=0.1, inner_lr=0.5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state[q]["mlp_in"].dtype == torch.float32
    for g in grads[2:]:
        q.grad = g.clone()
        resumed.step()
    assert resumed.state[q]["mlp_in"].dtype == torch.float32
    torch.testing.assert_close(q.detach(), p.detach())


def test_m3_slow_level_updates_every_frequency_steps():
    p = nn.Parameter(torch.randn(6, 4))
    opt = M3([p], lr=1e-2, frequency=3)
    slow = []
    for g in _grads((6, 4), 7):
        p.grad = g
        opt.step()
        slow.append(opt.state[p]["slow_momentum"].clone())
    assert slow[0].abs().sum() == 0 and slow[1].abs().sum() == 0 and slow[2].abs().sum() > 0
    assert torch.equal(slow[2], slow[4]) and not torch.equal(slow[4], slow[5])
    assert opt.state[p]["grad_sum"].abs().sum() > 0          # step 7: one gradient waiting


def test_m3_literal_step_is_unscaled():
    """update_rms=None: theta -= lr (O1 + alpha O2) / (sqrt(V) + eps), NL Algorithm 1 as written."""
    p = nn.Parameter(torch.zeros(5, 3))
    opt = M3([p], lr=1e-3, betas=(0.9, 0.95), frequency=100, update_rms=None)
    g = _grads((5, 3), 1)[0]
    p.grad = g
    opt.step()
    o1 = newton_schulz(0.1 * g)
    expected = -1e-3 * o1 / (g.abs() + 1e-8)          # bias-corrected V after one step is g^2
    torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-7)


def test_muon_step_matches_a_hand_computed_update():
    """Three Muon steps by hand from docs/OPTIMIZERS.md (NL Eq. 52 with the quintic NS):
    buf <- b buf + (1 - b) g;  d = (1 - b) g + b buf;  X = d / ||d||_F on the wide side,
    5 x  X <- a X + b' (X X^T) X + c (X X^T)^2 X with (a, b', c) = (3.4445, -4.7750, 2.0315);
    p <- p (1 - lr wd) - lr 0.2 sqrt(max(rows, cols)) X.  Built as train.py builds it (the
    OptimConfig defaults: momentum 0.95, nesterov, 5 steps, match_adamw). A tall and a wide
    matrix, so the scale's max(rows, cols) is checked both ways."""
    from config import OptimConfig

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.tall = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
            self.wide = nn.Parameter(torch.randn(3, 5, generator=g, dtype=torch.float64))

    def quintic_ns(d, steps=5):
        a, b, c = 3.4445, -4.7750, 2.0315
        x = d.T if d.shape[0] > d.shape[1] else d
        x = x / x.norm()
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + b * gram @ x + c * gram @ gram @ x
        return x.T if d.shape[0] > d.shape[1] else x

    cfg = OptimConfig(name="muon")
    lr, wd, beta = 0.3, cfg.weight_decay, 0.95      # cfg.momentum is None: Muon's default 0.95
    model = Hidden()
    groups = split_param_groups(model, cfg.weight_decay)
    assert [g["use_muon"] for g in groups] == [True]
    opt = build_optimizer("muon", groups, lr=lr, weight_decay=wd, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                          **optimizer_options("muon", cfg))
    params = [model.tall, model.wide]
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    grads = [_grads((6, 4), 3, seed=4), _grads((3, 5), 3, seed=5)]
    for step in range(3):
        before = [p.detach().clone() for p in params]
        for p, gs in zip(params, grads):
            p.grad = gs[step].to(torch.float64)
        opt.step()
        for i, p in enumerate(params):
            g = grads[i][step].to(torch.float64)
            bufs[i] = beta * bufs[i] + (1 - beta) * g
            ortho = quintic_ns((1 - beta) * g + beta * bufs[i])
            scale = 0.2 * max(p.shape) ** 0.5
            expected[i] = expected[i] * (1 - lr * wd) - lr * scale * ortho
            assert p.dtype == torch.float64
            # NS runs in fp32 on CPU: agreement to fp32 precision, far below any change of rule
            torch.testing.assert_close(p.detach(), expected[i], rtol=1e-5, atol=1e-6)
            # the orthogonalised update the optimiser applied (weight decay undone)
            applied = (before[i] * (1 - lr * wd) - p.detach()) / (lr * scale)
            singular = torch.linalg.svdvals(applied)
            assert len(singular) == min(p.shape)
            # OPTIMIZERS.md's "about [0.7, 1.2]": exactly, f(s) = a s + b s^3 + c s^5 maps
            # [f(1.050), f(0.5545)] = [0.682, 1.202] (its local min and max) into itself
            assert singular.min() > 0.68 and singular.max() < 1.21, (step, i, singular)
            # match_adamw: the update's RMS is 0.2 lr up to that band (RMS(NS) = rms(sv) / sqrt(max))
            rms = (p.detach() - before[i] * (1 - lr * wd)).square().mean().sqrt() / lr
            assert 0.2 * 0.68 < rms < 0.2 * 1.21, (step, i, rms)
            # and it keeps the direction's singular vectors: with d = U S V^T, the update is
            # U S' V^T, so (U V^T)^T update = V S' V^T (on the small side) is symmetric, eigenvalues S'
            u, _, vh = torch.linalg.svd((1 - beta) * g + beta * bufs[i], full_matrices=False)
            polar = u @ vh
            small = polar.T @ applied if p.shape[0] > p.shape[1] else applied @ polar.T
            torch.testing.assert_close(small, small.T, rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.linalg.eigvalsh(small).flip(0), singular, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------
# NL Fig. 4: psi(r, theta) = r^2 + k (r - theta + a sin(omega r))^2

FIG4_K, FIG4_A, FIG4_OMEGA = 5.0, 0.5, 3.0


def fig4_steps_to_threshold(delta_strength, start, lr=0.3, threshold=1e-3, max_steps=1000):
    w = nn.Parameter(torch.tensor([start]))                     # [[r, theta]]: a 1 x 2 matrix
    opt = DeltaMomentum([w], lr=lr, momentum=0.9, delta_strength=delta_strength, preconditioner="none")
    for step in range(max_steps):
        r, theta = w[0, 0], w[0, 1]
        loss = r ** 2 + FIG4_K * (r - theta + FIG4_A * torch.sin(FIG4_OMEGA * r)) ** 2
        if loss.item() < threshold:
            return step
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max_steps


@pytest.mark.parametrize("start", [(2.0, -1.0), (1.0, 1.0), (-1.5, 0.5)])
def test_fig4_delta_momentum_converges_faster_than_momentum(start):
    """Same lr and momentum; the lr is large enough that plain momentum overshoots the
    curved valley, which is where erasing along the gradient pays (docs/OPTIMIZERS.md)."""
    plain = fig4_steps_to_threshold(0.0, start)
    delta = fig4_steps_to_threshold(1.0, start)
    assert delta < 1000, "delta momentum did not converge"
    assert delta < 0.8 * plain, (start, plain, delta)


# ----------------------------------------------------------------------------------------
# resume

class RegressionWithUnusedWeight(Regression):
    """A matrix the loss never reaches (like a CMS level's W_v when no chunk completes inside
    seq_len): it never gets a gradient, so the optimiser never creates state for it."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.randn(8, 16) * 0.1)


def assert_resumes_exactly(name, save, load, model_class=Regression):
    """Train 3 steps, save, train 3 more == train 3 steps, save, restore into a fresh model and
    optimiser, train 3 more: bit-identical parameters. save(model, opt) -> what load(that,
    model, opt) restores both from."""
    torch.manual_seed(0)
    model = model_class()
    ids, target = regression_problem()

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (model(ids) - target).square().mean().backward()
            opt.step()

    opt = make(name, split_param_groups(model, 0.1), weight_decay=0.1)
    train(model, opt, 3)
    saved = save(model, opt)
    train(model, opt, 3)
    resumed = model_class()
    resumed_opt = make(name, split_param_groups(resumed, 0.1), weight_decay=0.1)
    load(saved, resumed, resumed_opt)
    train(resumed, resumed_opt, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip(name):
    """Save after 3 steps, load into a fresh optimiser, continue: bit-identical to not stopping."""
    def save(model, opt):
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
        return buffer

    def load(buffer, model, opt):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])

    assert_resumes_exactly(name, save, load)


@pytest.mark.parametrize("name,model_class", [(name, Regression) for name in OPTIMIZERS]
                         + [(name, RegressionWithUnusedWeight) for name in ("adamw", "muon")])
def test_dcp_checkpoint_round_trip(name, model_class, tmp_path):
    """The trainer's DCP checkpoints (checkpoint.py) resume every optimiser exactly, also with
    a parameter that never had a gradient (RegressionWithUnusedWeight): the saved optimiser has
    no state for it, a fresh one's template does, and the resumed one stays without state."""
    from checkpoint import load_training_state, save_checkpoint
    from config import Config
    save = (lambda model, opt: save_checkpoint(str(tmp_path), 3, model, opt, {"step": 3}, Config()))
    assert_resumes_exactly(name, save, load_training_state, model_class)


def test_dcp_load_of_an_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    """No DCP metadata: reported as unreadable, not as a model/optimiser mismatch."""
    from checkpoint import load_training_state
    model = Regression()
    opt = make("adamw", split_param_groups(model, 0.1))
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} is unreadable: "):
        load_training_state(str(tmp_path), model, opt)


# ----------------------------------------------------------------------------------------
# tiny LM

def lm_batches(steps, batch=4, seq=12, vocab=64, seed=0):
    """Arithmetic progressions mod vocab: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        seq_ids = (start + stride * torch.arange(seq + 1)) % vocab
        out.append((seq_ids[:, :-1], seq_ids[:, 1:]))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tiny_lm_loss_falls(name):
    from model import build_model
    torch.manual_seed(0)
    model = build_model({"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layer": 2, "n_head": 2})
    opt = make(name, split_param_groups(model, 0.1), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in lm_batches(30):
        _, loss, _ = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (name, losses[0], losses[-5:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_newton_schulz_and_tiny_lm():
    """On CUDA Newton-Schulz runs in bf16 (looser singular values) and every optimiser trains."""
    from model import build_model
    matrix = torch.randn(256, 128, device="cuda")
    singular = torch.linalg.svdvals(newton_schulz(matrix).float())
    assert singular.min() > 0.5 and singular.max() < 1.35, singular
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = build_model({"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layer": 2,
                             "n_head": 2}).cuda()
        opt = make(name, split_param_groups(model, 0.1), lr=1e-2, weight_decay=0.1)
        losses = []
        for x, y in lm_batches(30):
            _, loss, _ = model(x.cuda(), y.cuda())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (name, losses[0], losses[-5:])


# ----------------------------------------------------------------------------------------
# construction and errors

def test_split_param_groups_tied_embeddings_once():
    from model import build_model
    model = build_model({"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layer": 1, "n_head": 2})
    groups = split_param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    matrices, embeddings, vectors = groups
    assert matrices["use_muon"] and not embeddings["use_muon"] and not vectors["use_muon"]
    assert [p is model.embed.weight for p in embeddings["params"]] == [True]
    assert all(p.dim() == 2 for p in matrices["params"]) and all(p.dim() < 2 for p in vectors["params"])
    assert vectors["weight_decay"] == 0.0 and matrices["weight_decay"] == 0.1


def test_optimizer_options_from_config():
    cfg = {"momentum": 0.8, "ns_steps": 3, "m3_frequency": 4, "delta_strength": None, "dmgd_hidden": 4}
    assert optimizer_options("muon", cfg) == {"momentum": 0.8, "ns_steps": 3}
    assert optimizer_options("m3", cfg) == {"frequency": 4, "ns_steps": 3}
    assert optimizer_options("delta_momentum", cfg) == {"momentum": 0.8}
    assert optimizer_options("dmgd", cfg) == {"momentum": 0.8, "hidden": 4}
    assert optimizer_options("adamw", cfg) == {}
    opt = make("muon", [nn.Parameter(torch.randn(3, 3))], **optimizer_options("muon", cfg))
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["ns_steps"] == 3


def test_errors_name_what_is_wrong():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="optim.name='sgdx' is not one of: adamw, muon"):
        make("sgdx", [p])
    with pytest.raises(ValueError, match="unknown option.*frequency.*valid: momentum"):
        make("muon", [p], frequency=3)
    with pytest.raises(ValueError, match="shape \\(4,\\) is in a use_muon group"):
        Muon([nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\)"):
        DMGD([p], momentum=1.0)
    with pytest.raises(ValueError, match="frequency must be an integer >= 1"):
        M3([p], frequency=0)
    with pytest.raises(ValueError, match="preconditioner must be one of adam, none"):
        DeltaMomentum([p], preconditioner="shampoo")
    with pytest.raises(ValueError, match="betas must be two numbers"):
        PreconditionedMomentum([p], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="optim.name='nope'"):
        optimizer_options("nope", {})


# ----------------------------------------------------------------------------------------
# DTensor shards and FSDP2: 2 gloo ranks vs one process

@pytest.mark.slow
def test_dtensor_shards_match_single_process():
    from helpers import assert_torchrun_finished     # here: torchrun runs this file as its worker too
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert_torchrun_finished(result, [f"{check} ok {name}" for name in DEEP for check in ("dtensor", "fsdp2")])


def _dtensor_worker():
    """Each deep optimiser on Shard(0) DTensors (uneven rows, a batched 3-D tensor) must give
    the single-process parameters and state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    shapes = {"matrix": (5, 6), "batched": (3, 4, 5), "tall": (7, 3), "vector": (9,), "embed": (11, 4)}
    for name in DEEP:
        g = torch.Generator().manual_seed(0)
        full = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
        plain = {k: nn.Parameter(v.clone()) for k, v in full.items()}
        sharded = {k: nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for k, v in full.items()}

        def groups(params):
            deep = [params["matrix"], params["batched"], params["tall"]]
            rest = [params["embed"]]
            (rest if name in NEEDS_MATRICES else deep).append(params["vector"])
            return [{"params": deep, "weight_decay": 0.1}, {"params": rest, "use_muon": False}]

        opt_plain, opt_sharded = make(name, groups(plain)), make(name, groups(sharded))
        for step in range(4):
            for k, s in shapes.items():
                grad = torch.randn(*s, generator=g)
                plain[k].grad = grad.clone()
                sharded[k].grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            opt_plain.step()
            opt_sharded.step()
        for k in shapes:
            torch.testing.assert_close(sharded[k].full_tensor(), plain[k].detach(), rtol=1e-5, atol=1e-6)
            for key, value in opt_plain.state[plain[k]].items():
                other = opt_sharded.state[sharded[k]][key]
                other = other.full_tensor() if hasattr(other, "full_tensor") else other
                if torch.is_tensor(value):
                    torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k} {key}: {m}")
        if rank == 0:
            print(f"dtensor ok {name}", flush=True)

    # FSDP2 on the tiny LM: each rank trains on half the batch; gradients average to the full batch's
    from torch.distributed.fsdp import fully_shard
    from model import build_model
    lm_config = {"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layer": 2, "n_head": 2}
    batches = lm_batches(3, batch=4)
    for name in DEEP:
        torch.manual_seed(0)
        reference = build_model(lm_config)
        sharded = copy.deepcopy(reference)
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt_ref = make(name, split_param_groups(reference, 0.1), weight_decay=0.1)
        opt_fsdp = make(name, split_param_groups(sharded, 0.1), weight_decay=0.1)
        for x, y in batches:
            for model, opt, (xb, yb) in ((reference, opt_ref, (x, y)), (sharded, opt_fsdp, (x[rank::2], y[rank::2]))):
                opt.zero_grad()
                model(xb, yb)[1].backward()
                opt.step()
        # FSDP2's reduce-scatter rounds gradients differently; M3's 1/sqrt(V) amplifies that on
        # near-zero-gradient entries to ~2e-5 (a step is ~2e-3), hence atol 1e-4
        for (key, a), b in zip(sharded.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a.full_tensor(), b.detach(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} {key}: {m}")
        if rank == 0:
            print(f"fsdp2 ok {name}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":   # torchrun worker; the test sets PYTHONPATH to the repository root
    _dtensor_worker()


# ----------------------------------------------------------------------------------------
# more rules by hand (float64 oracles written from docs/OPTIMIZERS.md)

def _quintic_ns(d, steps=5):
    """docs/OPTIMIZERS.md's Newton-Schulz in float64, per matrix of a batch: Frobenius-normalise
    the wide orientation, 5 x X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = d.shape[-2] > d.shape[-1]
    x = d.double().mT if tall else d.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.mT if tall else x


def test_muon_spectral_scale_plain_momentum_and_batches_by_hand():
    """Muon with nesterov=False (direction = buf) and scale="spectral" (sqrt(max(1, rows /
    cols)) per matrix), on a tall, a wide and a 3-D parameter that is a batch of two 5 x 3
    matrices, each orthogonalised on its own (docs/OPTIMIZERS.md), with ns_steps=3 Newton-Schulz
    iterations: three steps by hand."""
    g = torch.Generator().manual_seed(8)
    shapes = [(6, 4), (3, 5), (2, 5, 3)]
    params = [nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]
    lr, wd, beta = 0.05, 0.1, 0.9
    opt = Muon(params, lr=lr, weight_decay=wd, momentum=beta, nesterov=False, scale="spectral", ns_steps=3)
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        for i, (shape, grad) in enumerate(zip(shapes, grads)):
            bufs[i] = beta * bufs[i] + (1 - beta) * grad
            scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
            expected[i] = expected[i] * (1 - lr * wd) - lr * scale * _quintic_ns(bufs[i], steps=3)
            torch.testing.assert_close(params[i].detach(), expected[i], rtol=1e-5, atol=1e-6)


def test_m3_steps_by_hand():
    """Six M3 steps (NL Algorithm 1 in docs/OPTIMIZERS.md's EMA form) with the slow level every
    2 steps, alpha 0.5, beta3 0.8, ns_steps 4, weight decay and the default update RMS 0.2:
    M1 <- b1 M1 + (1-b1) g; V <- b2 V + (1-b2) g^2; every f steps M2 <- b3 M2 + (1-b3) (sum of
    the last f g), O2 = NS(M2); D = (NS(M1) + alpha O2) / (sqrt(V / (1 - b2^t)) + eps);
    p <- p (1 - lr wd) - lr 0.2 D / RMS(D). Float64 parameters, NS in fp32 inside."""
    g = torch.Generator().manual_seed(9)
    p = nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
    lr, wd, (b1, b2), b3, alpha, f, eps = 0.01, 0.1, (0.9, 0.95), 0.8, 0.5, 2, 1e-8
    opt = M3([p], lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, beta3=b3, frequency=f, alpha=alpha, ns_steps=4)
    expected = p.detach().clone()
    m1, v, m2, grad_sum, o2 = (torch.zeros(5, 3, dtype=torch.float64) for _ in range(5))
    for t in range(1, 7):
        grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
        p.grad = grad
        opt.step()
        m1 = b1 * m1 + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        grad_sum = grad_sum + grad
        if t % f == 0:
            m2 = b3 * m2 + (1 - b3) * grad_sum
            grad_sum = torch.zeros_like(grad_sum)
            o2 = _quintic_ns(m2, steps=4)
        d = (_quintic_ns(m1, steps=4) + alpha * o2) / ((v / (1 - b2 ** t)).sqrt() + eps)
        d = 0.2 * d / d.square().mean().sqrt()
        expected = expected * (1 - lr * wd) - lr * d
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {t}: {m}")


def test_dmgd_inner_step_matches_autograd():
    """DMGD's analytic inner gradients (SiLU' included) against autograd on the objective of
    docs/OPTIMIZERS.md, in float64, over 4 steps (w_out is 0 at step 1, so W_in and c first
    move at step 2): u^ = g / RMS(g); b <- beta b - (1-beta) u^; z_j = (u^_j, b_j);
    L2 = mean_j u^_j (b_j + w_out . SiLU(W_in z_j + c)); theta <- beta theta - inner_lr dL2/dtheta;
    p <- p (1 - lr wd) + lr (b + w_out . SiLU(W_in z + c)) with the new theta.
    W_in starts at the unit directions (cos, sin)(2 pi i / hidden), c = w_out = 0."""
    g = torch.Generator().manual_seed(10)
    p = nn.Parameter(torch.randn(4, 6, generator=g))
    lr, wd, beta, hidden, inner_lr, eps = 0.1, 0.1, 0.9, 5, 0.5, 1e-8
    opt = DMGD([p], lr=lr, weight_decay=wd, eps=eps, momentum=beta, hidden=hidden, inner_lr=inner_lr)
    angle = torch.arange(hidden, dtype=torch.float64) * 2 * torch.pi / hidden
    w_in, c, w_out = torch.stack([angle.cos(), angle.sin()], dim=1), torch.zeros(hidden, dtype=torch.float64), \
        torch.zeros(hidden, dtype=torch.float64)
    b, expected = torch.zeros(24, dtype=torch.float64), p.detach().double().clone()
    for _ in range(4):
        grad = torch.randn(4, 6, generator=g)
        p.grad = grad
        opt.step()
        u = grad.double().flatten()
        u = u / (u.square().mean().sqrt() + eps)
        b = beta * b - (1 - beta) * u
        z = torch.stack([u, b])
        theta = [t.clone().requires_grad_() for t in (w_in, c, w_out)]
        objective = (u * (b + theta[2] @ torch.nn.functional.silu(theta[0] @ z + theta[1][:, None]))).mean()
        gi, gc, go = torch.autograd.grad(objective, theta)
        w_in, c, w_out = beta * w_in - inner_lr * gi, beta * c - inner_lr * gc, beta * w_out - inner_lr * go
        update = b + w_out @ torch.nn.functional.silu(w_in @ z + c[:, None])
        expected = expected * (1 - lr * wd) + lr * update.view(4, 6)
        state = opt.state[p]
        for name, value in (("mlp_in", w_in), ("mlp_bias", c), ("mlp_out", w_out)):
            torch.testing.assert_close(state[name].double(), value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert w_in.sub(torch.stack([angle.cos(), angle.sin()], dim=1) * beta ** 4).abs().max() > 1e-3   # W_in learned


def test_delta_momentum_with_adam_preconditioner_by_hand():
    """DeltaMomentum's default P = Adam diagonal (v <- b2 v + (1-b2) g^2, P g = g / (sqrt(v /
    (1 - b2^t)) + eps), eps large enough to matter), the erase step e = s / (1 + s ||g_i||_F^2)
    per matrix of a 3-D batch, and the elementwise rule for a vector, with weight decay:
    3 steps by hand (NL Eq. 48-49 in docs/OPTIMIZERS.md's EMA form)."""
    g = torch.Generator().manual_seed(11)
    batch, vector = nn.Parameter(torch.randn(2, 3, 4, generator=g)), nn.Parameter(torch.randn(5, generator=g))
    lr, wd, beta, b2, s, eps = 0.1, 0.1, 0.8, 0.9, 0.5, 1e-2
    opt = DeltaMomentum([batch, vector], lr=lr, weight_decay=wd, betas=(0.9, b2), eps=eps, momentum=beta,
                        delta_strength=s)
    expected = [batch.detach().double().clone(), vector.detach().double().clone()]
    m = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    v = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    for t in range(1, 4):
        grads = [torch.randn(2, 3, 4, generator=g) * torch.tensor([[[0.3]], [[3.0]]]), torch.randn(5, generator=g)]
        batch.grad, vector.grad = grads
        opt.step()
        for i, grad in enumerate(grads):
            grad = grad.double()
            v[i] = b2 * v[i] + (1 - b2) * grad ** 2
            write = grad / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            if i == 0:
                e = s / (1 + s * grad.square().sum(dim=(-2, -1), keepdim=True))
                m[i] = m[i] @ (beta * torch.eye(4, dtype=torch.float64) - e * grad.mT @ grad) + (1 - beta) * write
            else:
                m[i] = m[i] * (beta - s * grad ** 2 / (1 + s * grad ** 2)) + (1 - beta) * write
            expected[i] = expected[i] * (1 - lr * wd) - lr * m[i]
    for p, e in zip((batch, vector), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_split_param_groups_untied_head_and_decayed_embeddings():
    """docs/OPTIMIZERS.md: the embedding *and the LM head* go to AdamW (an untied head is its
    own matrix, not a hidden one) and both are decayed; only vectors are not decayed."""
    from model import build_model
    model = build_model({"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layer": 1, "n_head": 2,
                         "tie_embeddings": False})
    matrices, embeddings, vectors = split_param_groups(model, 0.1)
    assert {id(p) for p in embeddings["params"]} == {id(model.embed.weight), id(model.head.weight)}
    assert all(p is not model.head.weight for p in matrices["params"])
    assert embeddings["weight_decay"] == matrices["weight_decay"] == 0.1 and vectors["weight_decay"] == 0.0
    assert not embeddings["use_muon"] and not vectors["use_muon"] and matrices["use_muon"]


# ----------------------------------------------------------------------------------------
# the lr schedules (train.lr_at: config.py's optim.schedule, warmup_steps, min_lr_ratio)

@pytest.mark.parametrize("schedule,expected", [
    # linear warmup (step + 1) / warmup over steps 0..9, then the schedule from step 10 to max_steps 110
    ("cosine", {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 0.1 + 0.45 * (1 + 0.5 ** 0.5), 60: 0.55, 110: 0.1, 200: 0.1}),
    # WSD, decay_fraction 0.2: stable until int(110 * 0.8) = 88, then linear to the floor at 110
    ("wsd", {0: 0.1, 9: 1.0, 50: 1.0, 87: 1.0, 88: 1.0, 99: 0.55, 110: 0.1, 150: 0.1}),
    ("constant", {0: 0.1, 4: 0.5, 10: 1.0, 110: 1.0, 500: 1.0}),
])
def test_lr_schedules_by_hand(schedule, expected):
    """lr at chosen steps, by hand (lr 2, warmup 10, min_lr_ratio 0.1, max_steps 110):
    warmup lr (step + 1) / warmup; cosine min + (lr - min)(1 + cos(pi frac)) / 2 with
    frac = (step - warmup) / (max_steps - warmup) capped at 1; WSD lr until the last 20 %,
    then linear to min; constant lr. Without warmup the schedule starts at the full lr."""
    from config import Config, OptimConfig, TrainConfig
    from train import lr_at
    cfg = Config(optim=OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2),
                 train=TrainConfig(lr=2.0, max_steps=110))
    for step, value in expected.items():
        assert lr_at(step, cfg) == pytest.approx(2.0 * value, rel=1e-12), (schedule, step)
    cfg.optim.warmup_steps = 0
    assert lr_at(0, cfg) == pytest.approx(2.0)


def test_wsd_decays_after_a_warmup_longer_than_its_stable_phase():
    """warmup 100 of max_steps 110 with the last 20 % decaying (from step 88): the lr went from
    the full lr at step 99 to about half at step 100. The decay now starts after the warmup and
    falls linearly to the floor at max_steps."""
    from config import Config, OptimConfig, TrainConfig
    from train import lr_at
    cfg = Config(optim=OptimConfig(schedule="wsd", warmup_steps=100, min_lr_ratio=0.1, decay_fraction=0.2),
                 train=TrainConfig(lr=1.0, max_steps=110))
    lrs = [lr_at(step, cfg) for step in range(98, 112)]
    assert lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0)           # steps 99 and 100
    assert lrs[3] == pytest.approx(1.0 - 0.9 / 10) and lrs[12] == pytest.approx(0.1)  # 101, 110
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))                          # no rise after the warmup
