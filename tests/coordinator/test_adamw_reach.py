"""``adamw_reach`` bounds how far AdamW (mode 1, as ONNX Runtime runs it) can move one parameter, for any gradients.

``NormBound("auto")`` clips every update beyond sqrt(numel) * lr * adamw_reach(steps), on the claim that an honest
device can never get there. These tests check that claim three ways, on hypothesis-generated gradient sequences that
include the adversarial ones (constant sign, the Cauchy-Schwarz equality case g_i ~ (b2 / b1)^i, alternating signs,
spikes, zeros then a spike, gradients near epsilon): an independent NumPy AdamW in float64, ``backends.OrtAdamW``
(the PyTorch backend's optimizer) in float64 and float32, and ONNX Runtime's own ``AdamWOptimizer`` kernel with the
attributes of the bundle's exported optimizer. The equality case must come within 5% of the bound (so the bound is
tight), and a real ORT training run on the tiny bundle must keep every unit inside its bound.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.rounds import NormBound, adamw_reach, change_norms, unit_bounds, unit_sizes
from edge_runtime.backends import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY, OrtAdamW
from edge_runtime.bundle import load_manifest
from edge_runtime.data import EncodedData
from edge_runtime.session import TierSession, TrainConfig
from edge_runtime.update import default_assignment, tier_values_to_global

B1, B2 = ADAMW_BETAS
GROWTH = B2 / B1
"""g_i ~ GROWTH^i = (b1 / b2)^(-i) makes Cauchy-Schwarz an equality at every step: the fastest AdamW can move."""
TOL64 = 1e-6
"""Slack of the float64 checks (the brief's 1 + 1e-6)."""
TOL32 = 1e-5
"""Slack of the float32 checks (OrtAdamW in float32, ORT's kernel): float32 betas and rounding, from p0 = 0."""
KINDS = ("random", "heavy", "constant", "growing", "grow_then_flip", "alternating", "spike", "zeros_spike", "tiny")
LEARNING_RATES = (1e-4, 1e-3, 5e-3, 1e-2)


# -- reference optimizers ---------------------------------------------------------------------------------------


def numpy_adamw(p0: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray:
    """Independent float64 AdamW mode 1 (bias correction on the learning rate, eps added to sqrt(v), no decay):
    the parameters after one step per row of ``grads`` [T, P], from fresh moments."""
    p, m, v = p0.astype(np.float64).copy(), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, g in enumerate(np.asarray(grads, np.float64), 1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p = p - lr * math.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + ADAMW_EPS)
    return p


def torch_adamw(p0: np.ndarray, grads: np.ndarray, lr: float, dtype: str) -> np.ndarray:
    """``backends.OrtAdamW`` (what the PyTorch backend trains with) on the same sequence, in ``dtype``."""
    import torch

    param = torch.tensor(p0, dtype=getattr(torch, dtype))
    opt = OrtAdamW([param], lr=lr)
    for g in grads:
        param.grad = torch.tensor(g, dtype=param.dtype)
        opt.step()
    return param.detach().numpy().astype(np.float64)


class OrtKernel:
    """ONNX Runtime's ``AdamWOptimizer`` kernel with the exported node's attributes, run one step at a time.

    The bundle's optimizer model outputs only the updated flag (the training API updates its buffers in place), so
    the same node is rebuilt with its updated weights and moments as outputs and run in an InferenceSession."""

    def __init__(self, optimizer_model: Path) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        node = next(n for n in onnx.load(str(optimizer_model)).graph.node if n.op_type == "AdamWOptimizer")
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        seq = lambda name: helper.make_tensor_sequence_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
        scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [])  # noqa: E731
        copy = helper.make_node("AdamWOptimizer", ["lr", "step", "w", "g", "m1", "m2"], ["flag", "w1", "m1_out", "m2_out"],
                                domain="com.microsoft", **self.attributes)  # fmt: skip
        graph = helper.make_graph([copy], "adamw", [scalar("lr", TensorProto.FLOAT), scalar("step", TensorProto.INT64), seq("w"), seq("g"), seq("m1"), seq("m2")],
                                  [scalar("flag", TensorProto.BOOL), seq("w1"), seq("m1_out"), seq("m2_out")])  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16), helper.make_opsetid("com.microsoft", 1)])
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(self, p0: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray:
        """The parameters after one kernel step per row of ``grads``, steps counted from 1 as the training API does."""
        w, m1, m2 = [p0.astype(np.float32)], [np.zeros(p0.shape, np.float32)], [np.zeros(p0.shape, np.float32)]
        for t, g in enumerate(grads, 1):
            feed = {"lr": np.array(lr, np.float32), "step": np.array(t, np.int64), "w": w, "g": [g.astype(np.float32)], "m1": m1, "m2": m2}
            _, w, m1, m2 = self.session.run(None, feed)
        return w[0].astype(np.float64)


@pytest.fixture(scope="module")
def kernel(tiny_bundle: Path) -> OrtKernel:
    manifest = load_manifest(tiny_bundle)
    return OrtKernel(tiny_bundle / manifest.tier(2).files["optimizer_model"].path)


# -- gradient sequences -----------------------------------------------------------------------------------------


def sequence(kind: str, steps: int, scale: float, sign: float, where: int, rng: np.random.Generator) -> np.ndarray:
    """One parameter's gradients over ``steps`` steps of the given kind (``where``: a position in the sequence)."""
    i = np.arange(steps, dtype=np.float64)
    where = where % steps
    if kind == "random":
        return scale * rng.standard_normal(steps)
    if kind == "heavy":  # Cauchy: rare huge gradients among small ones
        return scale * np.clip(rng.standard_cauchy(steps), -1e6, 1e6)
    if kind == "constant":
        return np.full(steps, sign * scale)
    if kind == "growing":
        return sign * scale * GROWTH**i
    if kind == "grow_then_flip":  # the equality case, then a reversal that drags the moments back
        return sign * scale * GROWTH**i * np.where(i < where, 1.0, -1.0)
    if kind == "alternating":
        return sign * scale * (-1.0) ** i
    if kind == "spike":
        g = 1e-3 * scale * rng.standard_normal(steps)
        g[where] = sign * scale * 1e3
        return g
    if kind == "zeros_spike":
        return np.where(i == where, sign * scale, 0.0)
    if kind == "tiny":  # near and below eps, where eps decides the step
        return sign * ADAMW_EPS * 10.0 ** rng.uniform(-2, 1, steps) * rng.choice([-1.0, 1.0, 1.0, 1.0], steps)
    raise AssertionError(kind)


@st.composite
def gradient_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    """(p0 [P], gradients [T, P], lr): 1..4 parameters of independently drawn kinds, T in 1..200."""
    steps = draw(st.integers(1, 200))
    width = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    columns = []
    for _ in range(width):
        kind = draw(st.sampled_from(KINDS))
        scale = 10.0 ** draw(st.integers(-7, 2))
        columns.append(sequence(kind, steps, scale, draw(st.sampled_from((-1.0, 1.0))), draw(st.integers(0, 199)), rng))
    return rng.standard_normal(width), np.stack(columns, axis=1), draw(st.sampled_from(LEARNING_RATES))


def fuzz(cases: int) -> settings:
    """The same ``cases`` cases every run (derandomized), no deadline (the kernel runs up to 200 steps)."""
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


def assert_within(p0: np.ndarray, p: np.ndarray, lr: float, steps: int, tol: float, who: str) -> None:
    """Every parameter moved at most lr * adamw_reach(steps) * (1 + tol)."""
    moved = np.abs(p - p0) / (lr * adamw_reach(steps))
    assert moved.max() <= 1 + tol, f"{who}: a parameter moved {moved.max():.9f} x the bound in {steps} steps"


# -- the bound itself -------------------------------------------------------------------------------------------


def test_reach_is_one_step_of_lr_at_first_and_increasing() -> None:
    assert adamw_reach(1) == 1.0
    assert adamw_reach(0) == 0.0
    reach = np.array([adamw_reach(t) for t in range(0, 2001)])
    assert (np.diff(reach) > 0).all()
    steps = np.diff(reach)  # per-step reach c_t: 1 at first, growing towards (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2))
    assert (np.diff(steps) > 0).all() and steps[-1] < (1 - B1) / math.sqrt((1 - B2) * (1 - B1 * B1 / B2))


def test_the_exported_optimizer_is_the_one_the_bound_assumes(kernel: OrtKernel) -> None:
    """Mode 1 with bias correction, the betas and eps of ADAMW_*, and no weight decay (decay would add lr*wd*|p|)."""
    a = kernel.attributes
    assert a["adam_mode"] == 1 and a["correct_bias"] == 1 and a["weight_decay"] == ADAMW_WEIGHT_DECAY == 0.0
    assert (a["alpha"], a["beta"], a["epsilon"]) == pytest.approx((B1, B2, ADAMW_EPS), rel=1e-6)


@fuzz(200)
@given(case=gradient_cases())
def test_no_gradient_sequence_moves_a_parameter_beyond_the_reach(case: tuple[np.ndarray, np.ndarray, float], kernel: OrtKernel) -> None:
    p0, grads, lr = case
    steps = len(grads)
    reference = numpy_adamw(p0, grads, lr)
    assert_within(p0, reference, lr, steps, TOL64, "NumPy AdamW (float64)")
    ours = torch_adamw(p0, grads, lr, "float64")
    assert_within(p0, ours, lr, steps, TOL64, "OrtAdamW (float64)")
    np.testing.assert_allclose(ours - p0, reference - p0, rtol=1e-9, atol=1e-12 * lr)
    zero = np.zeros_like(p0)  # float32 runs from 0: the rounding of large starting values is not the optimizer's
    assert_within(zero, torch_adamw(zero, grads, lr, "float32"), lr, steps, TOL32, "OrtAdamW (float32)")
    assert_within(zero, kernel.run(zero, grads, lr), lr, steps, TOL32, "ONNX Runtime AdamWOptimizer kernel")


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_growing_gradients_reach_the_bound(steps: int, kernel: OrtKernel) -> None:
    """The Cauchy-Schwarz equality case moves within 5% of the bound: the bound is tight, not a loose guess."""
    grads = (GROWTH ** np.arange(steps, dtype=np.float64))[:, None] * np.array([1.0, -3.0, 1e-2])  # both signs, eps negligible
    p0, lr = np.array([0.0, 0.5, -2.0]), 1e-3
    zero = np.zeros(3)
    for who, p, start in (("NumPy", numpy_adamw(p0, grads, lr), p0), ("OrtAdamW", torch_adamw(p0, grads, lr, "float64"), p0),
                          ("ORT kernel", kernel.run(zero, grads, lr), zero)):  # fmt: skip
        ratio = np.abs(p - start) / (lr * adamw_reach(steps))
        assert ratio.min() >= 0.95, f"{who}: the equality case moved only {ratio.min():.4f} x the bound in {steps} steps"
        assert ratio.max() <= 1 + TOL32, f"{who}: {ratio.max():.9f} x the bound in {steps} steps"


# -- a real ONNX Runtime training run ---------------------------------------------------------------------------


def tiny_rows(n: int, seed: int = 0) -> EncodedData:
    """``n`` rows of random token ids of the tiny vocabulary (43 tokens), three labels."""
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[2], rng.integers(5, 43, rng.integers(3, 14)), [3]]).astype(np.int64) for _ in range(n)]
    return EncodedData(ids, rng.integers(0, 3, n).astype(np.int64))


def unit_kind(unit: str) -> str:
    return "expert" if ".experts." in unit else "router" if "router_rows" in unit else "head"


@pytest.mark.parametrize("slots", [2, 4])
def test_honest_ort_training_stays_inside_every_units_bound(tiny_bundle: Path, slots: int) -> None:
    """10 steps of the real training API at lr 1e-2: every unit (expert, router rows, head) moves less than
    ``NormBound("auto")`` allows, every parameter less than lr * adamw_reach(10), and the moves are those of the
    NumPy reference fed the gradients ORT computed (so the kernel, its step count and its constants are the
    bound's)."""
    from safetensors.numpy import load_file

    manifest, lr, steps = load_manifest(tiny_bundle), 1e-2, 10
    session = TierSession(tiny_bundle, manifest, slots, "ort", threads=1)
    assignment = default_assignment(manifest, slots)
    session.load(load_file(str(tiny_bundle / manifest.global_pool.path)), assignment)
    before = session.values()
    data = tiny_rows(40)
    result = session.train(data, TrainConfig(epochs=1, batch_size=4, max_steps=steps, learning_rate=lr))
    assert result.steps == steps
    sent = tier_values_to_global(manifest, slots, assignment, before)
    norms = change_norms(session.update(result.examples, result.stats), sent)
    bounds = unit_bounds(sent, NormBound("auto"), lr, steps)
    assert set(norms) == set(bounds) and {unit_kind(u) for u in norms} == {"expert", "router", "head"}
    sizes = unit_sizes(sent)
    for unit, norm in norms.items():
        assert norm < bounds[unit], f"{unit} ({sizes[unit]} parameters) moved {norm:.6g}, bound {bounds[unit]:.6g}"
        assert norm > 0, f"{unit} did not train"
    after = session.values()
    for name in before:
        assert_within(before[name].astype(np.float64), after[name].astype(np.float64), lr, steps, TOL32, name)

    # The same steps again, one at a time, recording ORT's gradients for the NumPy reference.
    replay = TierSession(tiny_bundle, manifest, slots, "ort", threads=1)
    replay.set_values(before)
    ort: Any = replay.backend.session
    ort.set_learning_rate(lr)
    grads: dict[str, list[np.ndarray]] = {name: [] for name in before}
    for batch in data.batches(4, True, 0):
        ort.forward_backward(replay.inputs(batch))
        for name in grads:
            grads[name].append(ort.grad(name))
        ort.optimizer.step()
    for name, value in replay.values().items():
        expected = numpy_adamw(before[name].ravel(), np.stack([g.ravel() for g in grads[name]]), lr).reshape(value.shape)
        moved, want = value.astype(np.float64) - before[name], expected - before[name]
        assert np.abs(moved - want).max() <= 1e-4 * lr * steps, f"{name}: ORT's moves differ from the NumPy AdamW's"
        np.testing.assert_array_equal(value, after[name], err_msg=f"{name}: the replay is not the same training")
