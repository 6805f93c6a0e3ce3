"""Capture: flat ATen graphs that keep the original output structure, annotated nodes, clear errors."""

import collections

import pytest
import torch

import dioe
from dioe.errors import CaptureError, InputSpecError

from helpers import assert_matches_eager, eager


class DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, *, scale):
        y = self.lin(x)
        return {"y": y * scale, "pair": (y.sum(), torch.relu(y)), "argmax": y.argmax(-1)}


def test_dict_and_tuple_outputs_keep_their_structure():
    m, x, s = DictOut(), torch.randn(3, 8), torch.tensor(2.0)
    g = dioe.capture(m, (x,), {"scale": s})
    assert_matches_eager(eager(m, (x,), {"scale": s}), g(x, scale=s), rtol=1e-6)


def test_model_output_is_rebuilt_like_its_constructor_builds_it():
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class M(torch.nn.Module):
        def forward(self, x):
            return outputs.BaseModelOutputWithPooling(last_hidden_state=x * 2, pooler_output=x.sum(-1))

    x = torch.randn(2, 3)
    g = dioe.capture(M(), (x,))
    assert g._rebuild is not None, "a ModelOutput of tensors takes the fast rebuild"
    got, want = g(x), M()(x)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys()) == ["last_hidden_state", "pooler_output"]
    assert got.hidden_states is None and got.attentions is None and got.to_tuple()[1].shape == (2,)
    assert got.last_hidden_state is got["last_hidden_state"] and got[1] is got.pooler_output
    assert_matches_eager(want, got, rtol=1e-6)
    nested = dioe.capture(DictOut(), (torch.randn(3, 8),), {"scale": torch.tensor(2.0)})
    assert nested._rebuild is None, "nested structures are rebuilt by tree_unflatten"


def test_namedtuple_output():
    Out = collections.namedtuple("Out", "a b")

    class M(torch.nn.Module):
        def forward(self, x):
            return Out(x + 1, x * 2)

    x = torch.randn(2, 2)
    assert_matches_eager(Out(x + 1, x * 2), dioe.capture(M(), (x,))(x))


def test_every_node_is_annotated():
    g = dioe.capture(DictOut(), (torch.randn(3, 8),), {"scale": torch.tensor(2.0)})
    for n in g.gm.graph.nodes:
        assert "dioe.cost" in n.meta and "dioe.tensor" in n.meta and "dioe.module" in n.meta, n.format_node()
    lin = next(n for n in g.compute_nodes if "linear" in str(n.target))
    assert lin.meta["dioe.module"] == "lin"
    assert lin.meta["dioe.cost"].flops == 2 * 3 * 8 * 4
    assert lin.meta["dioe.tensor"].shape == (3, 4) and lin.meta["dioe.tensor"].dtype == "float32"
    assert lin.meta["dioe.cost"].bytes_read == (3 * 8 + 4 * 8 + 4) * 4


def test_graph_is_flat_and_eval_mode():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    m.train()
    x = torch.randn(2, 4)
    g = dioe.capture(m, (x,))
    assert not m.training, "capture puts the model in eval mode"
    assert not any("dropout" in str(n.target) for n in g.compute_nodes), "eval dropout is removed"
    out = g.gm(x)
    assert isinstance(out, tuple) and len(out) == 1


def test_wrong_inputs_get_clear_errors():
    g = dioe.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),), name="lin")
    with pytest.raises(InputSpecError, match=r"shape \[5, 4\], captured shape is \[3, 4\]"):
        g(torch.randn(5, 4))
    with pytest.raises(InputSpecError, match="dtype float64, captured dtype is float32"):
        g(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(InputSpecError, match="expected 1 positional input"):
        g(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(InputSpecError, match="keyword inputs"):
        g(torch.randn(3, 4), extra=1)
    # what the hot path lets through unchecked must still be named when wrong
    with pytest.raises(InputSpecError, match=r"shape \[3, 4, 1\], captured shape is \[3, 4\]"):
        g(torch.randn(3, 4, 1))
    with pytest.raises(InputSpecError, match=r"positional input 0 is a list, not what was captured; "
                                             r"expected \(input_1: float32\[3, 4\]\)"):
        g([[0.0] * 4] * 3)
    with pytest.raises(InputSpecError, match="is on meta, captured on cpu"):
        g(torch.empty(3, 4, device="meta"))
    x = torch.randn(4, 3).t()  # a non-contiguous view of the captured shape is a valid input
    torch.testing.assert_close(g(x), g(x.contiguous()))


def test_dynamic_batch_dimension():
    batch = torch.export.Dim("batch", min=1, max=64)
    g = dioe.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),), dynamic_shapes=({0: batch},))
    assert isinstance(g.input_specs[0].shape[0], str)
    x = torch.randn(7, 4)
    assert g(x).shape == (7, 2)


def test_data_dependent_control_flow_names_the_construct():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x + 1
            return x - 1

    with pytest.raises(CaptureError) as info:
        dioe.capture(Branchy(), (torch.randn(3),))
    msg = str(info.value)
    assert "Branchy" in msg and "test_capture.py" in msg and "torch.cond" in msg


def test_cache_object_output_suggests_use_cache_false():
    class Cache:
        def __init__(self, t):
            self.t = t

    class WithCache(torch.nn.Module):
        def forward(self, x):
            return x * 2, Cache(x)

    with pytest.raises(CaptureError, match="use_cache=False"):
        dioe.capture(WithCache(), (torch.randn(2),))


def test_not_a_module():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        dioe.capture(lambda x: x, (torch.randn(2),))


@pytest.mark.models
@pytest.mark.parametrize("name", ["bert-base", "resnet50", "gpt2", "vit-base", "mobilenetv2", "minilm"])
def test_zoo_models_capture_and_match_eager(name, zoo_size):
    model, inputs = dioe.zoo.load(name, size=zoo_size)
    g = dioe.capture(model, inputs, name=name)
    assert_matches_eager(eager(model, inputs), g(*inputs), rtol=1e-5, what=name)
    s = g.summary()
    assert s["gflops"] > 0 and s["ops"] and s["heaviest"]
