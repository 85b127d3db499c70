"""Router, experts and auxiliary losses against direct NumPy computations."""

from __future__ import annotations

import numpy as np
import torch

from exporter.moe import Expert, MoEAdapter, Router, routing_aux_losses


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_router_picks_top_k_and_renormalises_gates() -> None:
    torch.manual_seed(0)
    router = Router(hidden_size=6, slots=5, top_k=2)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
    h = torch.randn(3, 4, 6)
    probs, selected, gates = router(h)
    ref = _softmax(h.numpy() @ router.weight.detach().numpy().T + router.bias.detach().numpy())
    np.testing.assert_allclose(probs.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    top2 = np.argsort(-ref, axis=-1)[..., :2]
    want_sel = np.zeros_like(ref)
    np.put_along_axis(want_sel, top2, 1.0, axis=-1)
    np.testing.assert_array_equal(selected.numpy(), want_sel)
    want_gates = ref * want_sel / (ref * want_sel).sum(-1, keepdims=True)
    np.testing.assert_allclose(gates.detach().numpy(), want_gates, rtol=1e-5, atol=1e-6)


def random_moe(seed: int, slots: int, expert_dim: int) -> tuple[MoEAdapter, torch.Tensor]:
    """An adapter (d = 6, top-2) with standard-normal parameters, and an input [2, 5, 6]."""
    torch.manual_seed(seed)
    moe = MoEAdapter(hidden_size=6, slots=slots, expert_dim=expert_dim, top_k=2)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    return moe, torch.randn(2, 5, 6)


def test_moe_output_is_gate_weighted_sum_of_selected_experts() -> None:
    moe, h = random_moe(seed=1, slots=3, expert_dim=4)
    delta, probs, selected = moe(h)
    gates = (probs * selected / (probs * selected).sum(-1, keepdim=True)).detach().numpy()
    want = np.zeros(h.shape, np.float32)
    for j, expert in enumerate(moe.experts):
        want += gates[..., j : j + 1] * expert(h).detach().numpy()
    np.testing.assert_allclose(delta.detach().numpy(), want, rtol=1e-4, atol=1e-5)


def test_fused_slots_give_the_per_expert_gradients() -> None:
    """The two-GEMM forward has the gradients of sum_j g_j E_j(h) computed one expert at a time."""
    moe, h = random_moe(seed=2, slots=4, expert_dim=3)
    moe(h)[0].square().sum().backward()
    fused = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    _, _, gates = moe.router(h)
    ref = sum(gates[..., j : j + 1] * e(h) for j, e in enumerate(moe.experts))
    ref.square().sum().backward()
    for n, p in moe.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert fused["experts.0.w1"].abs().sum() > 0


def test_expert_is_two_layer_ffn() -> None:
    e = Expert(4, 3)
    with torch.no_grad():
        for p in e.parameters():
            p.normal_()
    h = torch.randn(2, 4)
    w1, b1, w2, b2 = (getattr(e, n).detach().numpy() for n in ("w1", "b1", "w2", "b2"))
    a = h.numpy() @ w1 + b1
    gelu = 0.5 * a * (1 + np.vectorize(__import__("math").erf)(a / np.sqrt(2)))
    np.testing.assert_allclose(e(h).detach().numpy(), gelu @ w2 + b2, rtol=1e-5, atol=1e-5)


def test_aux_losses_match_numpy_over_real_tokens_only() -> None:
    rng = np.random.default_rng(0)
    B, S, t, k = 3, 5, 4, 2
    probs = _softmax(rng.normal(size=(B, S, t))).astype(np.float32)
    top = np.argsort(-probs, axis=-1)[..., :k]
    sel = np.zeros_like(probs)
    np.put_along_axis(sel, top, 1.0, axis=-1)
    mask = np.ones((B, S), np.int64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    bal, het, counts, psum = routing_aux_losses(
        torch.from_numpy(probs), torch.from_numpy(sel), torch.from_numpy(mask), torch.from_numpy(q), k
    )
    real = mask.astype(bool)
    n = real.sum()
    f = sel[real].sum(0) / (n * k)
    p = probs[real].mean(0)
    np.testing.assert_allclose(bal.item(), t * (f * p).sum(), rtol=1e-5)
    np.testing.assert_allclose(het.item(), (q * np.log(q / p)).sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(counts.numpy(), sel[real].sum(0), rtol=1e-6)
    np.testing.assert_allclose(psum.numpy(), probs[real].sum(0), rtol=1e-5)


def test_balance_is_one_and_kl_zero_when_routing_is_uniform() -> None:
    t = 4
    probs = torch.full((2, 3, t), 1.0 / t)
    sel = torch.zeros(2, 3, t)
    sel[..., :2] = 1.0
    sel[1, :, :2], sel[1, :, 2:] = 0.0, 1.0  # half the tokens on slots 0-1, half on 2-3: f uniform
    bal, het, _, _ = routing_aux_losses(probs, sel, torch.ones(2, 3), torch.full((t,), 1.0 / t), 2)
    assert abs(bal.item() - 1.0) < 1e-6
    assert abs(het.item()) < 1e-6


def test_kl_ignores_slots_with_zero_target() -> None:
    probs = torch.tensor([[[0.5, 0.5]]])
    sel = torch.ones(1, 1, 2)
    _, het, _, _ = routing_aux_losses(probs, sel, torch.ones(1, 1), torch.tensor([1.0, 0.0]), 2)
    assert abs(het.item() - np.log(2.0)) < 1e-6


def test_soft_balance_where_every_slot_is_active_matches_numpy_and_has_a_gradient() -> None:
    """k = t (tier 2 at top-k 2): Switch's term is the constant 1; switch-soft's is t * sum_j p_j^2 with a gradient."""
    rng = np.random.default_rng(1)
    B, S, t = 2, 6, 2
    logits = torch.from_numpy(rng.normal(size=(B, S, t)).astype(np.float32)).requires_grad_(True)
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[1, 4:] = 0
    q = torch.full((t,), 1.0 / t)
    sel = torch.ones(B, S, t)
    grads = {}
    for rule in ("switch", "switch-soft"):
        logits.grad = None
        probs = torch.softmax(logits, dim=-1)
        bal, _, _, _ = routing_aux_losses(probs, sel, mask, q, t, rule)
        bal.backward()
        grads[rule] = logits.grad.abs().max().item()
        p = probs.detach().numpy()[mask.numpy().astype(bool)].mean(0)
        want = 1.0 if rule == "switch" else t * (p * p).sum()
        np.testing.assert_allclose(bal.item(), want, rtol=1e-5)
    assert grads["switch"] < 1e-7 and grads["switch-soft"] > 1e-3, grads


def test_soft_balance_is_switch_where_slots_are_chosen() -> None:
    rng = np.random.default_rng(2)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(2, 5, 4)).astype(np.float32)), dim=-1)
    kth = torch.topk(probs, 2, dim=-1).values[..., -1:]
    sel = (probs >= kth).float()
    args = (probs, sel, torch.ones(2, 5), torch.full((4,), 0.25), 2)
    assert routing_aux_losses(*args, "switch")[0].item() == routing_aux_losses(*args, "switch-soft")[0].item()
