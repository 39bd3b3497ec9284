"""bench/kernels.py times fla's chunk_gated_delta_rule on our delta_rule's inputs through the
DESIGN §3.2 reparameterisation (its docstring: g = log alpha, beta = eta / alpha,
v = u alpha / eta, states transposed). These tests check that mapping on CPU, so a GPU run's
"vs fla" column compares the same recurrence: against a float64 gated delta rule written from
fla's definition, and against fla's own sequential reference where fla imports (CI has no fla;
bench/fetch_fla.sh puts it in .fla/site for the GPU check)."""
import importlib.util

import pytest
import torch

from bench.kernels import fla_delta_rule, fla_ungated_delta_rule, scan_inputs
from kernels import delta_rule_reference


def gated_delta_rule_fla_convention(q, k, v, g, beta, scale=None, initial_state=None,
                                    output_final_state=False):
    """fla's gated delta rule, token by token, with fla's conventions: h = S^T [B,H,K,V],
    h_t = exp(g_t) h_{t-1}; v'_t = beta_t (v_t - h_t^T k_t); h_t += k_t v'_t^T; o_t = scale h_t^T q_t."""
    B, T, H, K = k.shape
    h = initial_state.double() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    o = []
    for t in range(T):
        h = h * g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", h, k[:, t])
        h = h + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
        o.append(scale * torch.einsum("bhkv,bhk->bhv", h, q[:, t]))
    return torch.stack(o, 1), (h if output_final_state else None)


@pytest.mark.parametrize("T", [1, 37, 64])
def test_fla_mapping_gives_our_delta_rule(T):
    """Outputs and final state of the mapped call equal our sequential delta rule (float64)."""
    x = scan_inputs("delta_rule", 2, T, 3, 8, "cpu", torch.float64, seed=T)
    o_ref, S_ref = delta_rule_reference(**x)
    o, S = fla_delta_rule(gated_delta_rule_fla_convention)(**x)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


def delta_rule_fla_convention(q, k, v, beta, scale=None, initial_state=None, output_final_state=False):
    """fla's (ungated) delta rule: the gated one at g = 0."""
    return gated_delta_rule_fla_convention(q, k, v, torch.zeros_like(beta), beta, scale, initial_state,
                                           output_final_state)


@pytest.mark.parametrize("T", [1, 37])
def test_fla_ungated_mapping_gives_our_delta_rule_at_alpha_1(T):
    """bench op delta_rule_ungated: alpha = 1, and the mapped ungated call equals our rule."""
    x = scan_inputs("delta_rule_ungated", 2, T, 3, 8, "cpu", torch.float64, seed=T)
    assert bool((x["alpha"] == 1).all())
    o_ref, S_ref = delta_rule_reference(**x)
    o, S = fla_ungated_delta_rule(delta_rule_fla_convention)(**x)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                    reason="fla is not importable (bench/fetch_fla.sh puts it in .fla/site)")
@pytest.mark.filterwarnings("ignore:Triton is not supported on current platform")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # fla's import: torch.jit notices
def test_fla_mapping_against_fla_reference():
    """The same against fla's own chunked PyTorch reference (float32 inside)."""
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    x = scan_inputs("delta_rule", 2, 100, 3, 16, "cpu", torch.float64)
    o_ref, S_ref = delta_rule_reference(**x)
    o, S = fla_delta_rule(naive_chunk_gated_delta_rule)(**x)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(S.double(), S_ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                    reason="fla is not importable (bench/fetch_fla.sh puts it in .fla/site)")
@pytest.mark.filterwarnings("ignore:Triton is not supported on current platform")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fla_ungated_mapping_against_fla_reference():
    """The ungated mapping against fla's own sequential delta rule (head-first layout; it
    scales q by K^-1/2 itself, undone here to stand for scale = 1)."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    def fla_ungated(q, k, v, beta, scale, initial_state, output_final_state):
        heads_first = [t.transpose(1, 2) for t in (q * scale * q.shape[-1] ** 0.5, k, v, beta)]
        o, h = delta_rule_recurrence(*heads_first, initial_state=initial_state,
                                     output_final_state=output_final_state)
        return o.transpose(1, 2), h
    x = scan_inputs("delta_rule_ungated", 2, 50, 3, 16, "cpu", torch.float64)
    o_ref, S_ref = delta_rule_reference(**x)
    o, S = fla_ungated_delta_rule(fla_ungated)(**x)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(S.double(), S_ref, rtol=0, atol=1e-5)
