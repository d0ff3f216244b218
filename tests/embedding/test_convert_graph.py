"""The shared ONNX graph builder: each op against numpy, and adding to an existing graph."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.embedding.convert.graph import IR_VERSION, OPSET, GraphBuilder, check, tensor
from service.embedding.convert.weights import Weights, WeightsError

RNG = np.random.default_rng(0)


def run(g: GraphBuilder, inputs: dict[str, np.ndarray], out: str, dims: list[int | str]
        ) -> np.ndarray:
    """Wrap the builder's graph with float inputs and one output, and run it."""
    model = g.model(name="t", inputs=[tensor(k, v.shape) for k, v in inputs.items()],
                    outputs=[tensor(out, dims)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([out], inputs)[0]


def test_dense_is_matmul_plus_bias_on_any_rank() -> None:
    x = RNG.normal(size=(2, 5, 3)).astype(np.float32)
    w, b = RNG.normal(size=(3, 4)), RNG.normal(size=4)
    g = GraphBuilder()
    y = run(g, {"x": x}, g.dense("x", w, b, prefix="fc"), [2, 5, 4])
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    assert {i.data_type for i in g.initializers} == {TensorProto.FLOAT}


def test_layer_norm_over_the_last_axis() -> None:
    x = RNG.normal(size=(2, 5, 6)).astype(np.float32)
    scale, bias = RNG.normal(size=6), RNG.normal(size=6)
    g = GraphBuilder()
    y = run(g, {"x": x}, g.layer_norm("x", scale, bias, eps=1e-5, prefix="ln"), [2, 5, 6])
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)


def test_gelu_is_the_exact_erf_form() -> None:
    x = np.linspace(-4, 4, 41, dtype=np.float32).reshape(1, -1)
    g = GraphBuilder()
    y = run(g, {"x": x}, g.gelu("x"), [1, 41])
    want = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x[0].astype(float)]
    np.testing.assert_allclose(y[0], want, atol=1e-6)


def test_attention_matches_numpy_and_the_bias_masks_keys() -> None:
    n, length, heads, width = 2, 4, 3, 6
    q, k, v = (RNG.normal(size=(n, length, width)).astype(np.float32) for _ in range(3))
    bias = np.zeros((n, 1, 1, length), np.float32)
    bias[1, ..., 2:] = -10000.0  # the second row's last two tokens are padding
    g = GraphBuilder()
    y = run(g, {"q": q, "k": k, "v": v, "bias": bias},
            g.attention("q", "k", "v", heads=heads, width=width, bias="bias"),
            [n, length, width])

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(n, length, heads, width // heads).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(width // heads) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(n, length, width)
    np.testing.assert_allclose(y, want, atol=1e-5)
    # Changing a masked-out value changes nothing.
    v2 = v.copy()
    v2[1, 3] += 100.0
    g2 = GraphBuilder()
    y2 = run(g2, {"q": q, "k": k, "v": v2, "bias": bias},
             g2.attention("q", "k", "v", heads=heads, width=width, bias="bias"),
             [n, length, width])
    np.testing.assert_allclose(y2[1], y[1], atol=1e-4)


def test_masked_mean_counts_only_unmasked_rows() -> None:
    x = RNG.normal(size=(3, 4, 2)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    g = GraphBuilder()
    y = run(g, {"x": x, "mask": mask}, g.masked_mean("x", "mask"), [3, 2])
    np.testing.assert_allclose(y[0], x[0].mean(0), atol=1e-6)
    np.testing.assert_allclose(y[1], x[1, 0], atol=1e-6)
    np.testing.assert_array_equal(y[2], [0, 0])  # nothing to average: zero, not NaN


@pytest.mark.parametrize("clamp", [False, True])
def test_l2_normalize_adds_or_clamps_eps(clamp: bool) -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-4, 0.0]], np.float32)
    eps = 1e-3
    g = GraphBuilder()
    y = run(g, {"x": x}, g.l2_normalize("x", eps=eps, clamp=clamp, output="unit"), [3, 2])
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    want = x / (np.maximum(norm, eps) if clamp else norm + eps)
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_shared_constants_are_added_once_per_value() -> None:
    g = GraphBuilder()
    a = g.shared("one", np.array(1.0, np.float32))
    assert g.shared("other", np.array(1.0, np.float32)) == a
    assert g.shared("one", np.array([1.0], np.float32)) != a  # another shape
    assert g.shared("one", np.array(1.0, np.float64)) != a  # another dtype
    assert len(g.initializers) == 3


def test_model_is_checked_and_carries_the_opset() -> None:
    g = GraphBuilder()
    g.op("Relu", ["x"], output="y")
    model = g.model(name="t", inputs=[tensor("x", ["N", 2])], outputs=[tensor("y", ["N", 2])],
                    metadata={"architecture": "relu"})
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert {p.key: p.value for p in model.metadata_props} == {"architecture": "relu"}
    bad = GraphBuilder()
    bad.op("Relu", ["missing"], output="y")
    with pytest.raises(onnx.checker.ValidationError):
        bad.model(name="t", inputs=[tensor("x", ["N", 2])], outputs=[tensor("y", ["N", 2])])


def test_shape_inference_catches_what_the_plain_check_does_not() -> None:
    g = GraphBuilder()
    g.op("MatMul", ["x", g.constant("w", np.ones((3, 2), np.float32))], output="y")
    kwargs = {"name": "t", "inputs": [tensor("x", ["N", 4])], "outputs": [tensor("y", ["N", 2])]}
    with pytest.raises(onnx.shape_inference.InferenceError):
        g.model(**kwargs)  # [N, 4] @ [3, 2]
    assert g.model(**kwargs, infer_shapes=False).graph.name == "t"


def test_add_to_an_existing_graph_first_or_last_with_prefixed_names() -> None:
    model = helper.make_model(
        helper.make_graph([helper.make_node("Neg", ["x"], ["y"], name="neg")], "base",
                          [tensor("x", ["N", 2])], [tensor("y", ["N", 2])]),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    graph = model.graph
    graph.node[0].input[:] = ["x_in"]
    front = GraphBuilder(prefix="front_")
    doubled = front.op("Mul", ["x", front.constant("two", np.array(2.0, np.float32))])
    front.op("Sub", [doubled, front.constant("half", np.array(0.5, np.float32))], output="x_in")
    front.add_to(graph, first=True)
    graph.node[-1].output[:] = ["y_neg"]
    back = GraphBuilder(prefix="back_")
    back.op("Add", ["y_neg", back.constant("one", np.array(1.0, np.float32))], output="y")
    back.add_to(graph)
    check(model)
    assert [n.op_type for n in graph.node] == ["Mul", "Sub", "Neg", "Add"]
    assert [n.name for n in graph.node] == [doubled, "front_x_in", "neg", "back_y"]
    assert all(i.name.startswith(("front_", "back_")) for i in graph.initializer)
    x = np.array([[1.0, -2.0]], np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], -(2 * x - 0.5) + 1)


def test_include_copies_another_graph_in() -> None:
    inner = GraphBuilder(prefix="b0_")
    inner.op("Mul", ["x", inner.constant("k", np.array(3.0, np.float32))], output="b0_y")
    outer = GraphBuilder()
    outer.include(helper.make_graph(inner.nodes, "inner", [], [], inner.initializers))
    y = run(outer, {"x": np.ones((1, 2), np.float32)}, outer.op("Neg", ["b0_y"]), [1, 2])
    np.testing.assert_allclose(y, [[-3.0, -3.0]])


def test_weights_get_casts_and_checks_shape() -> None:
    w = Weights({"a": np.ones((2, 3), np.float32)})
    assert w.get("a").dtype == np.float64
    assert w.get("a", (2, 3), dtype=np.float32).dtype == np.float32
    with pytest.raises(WeightsError, match="shape"):
        w.get("a", (3, 2))
    with pytest.raises(WeightsError, match="'b'"):
        w.get("b")
