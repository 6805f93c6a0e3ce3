"""dioe.rewrite.swap_attention: the standard mechanism reproduces the model, linear attention honours padding and
causality, a swapped model optimizes like any other, and bad input says what is allowed."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_eager, eager

import dioe
import dioe.rewrite
from dioe.attention import AttentionMechanism, LinearAttention, StandardAttention


def _tiny(kind: str):
    """A transformers model of `kind` with a few thousand weights, in eval mode, and its example inputs."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert":
        model, inputs = dioe.zoo.load("tiny-bert")
        return model.eval(), _padded(inputs)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, use_cache=False,
                            bos_token_id=0, eos_token_id=0)
        ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
        return tf.GPT2Model(cfg).eval(), (ids,)
    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8)
    return tf.ViTModel(cfg).eval(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def _padded(inputs):
    """tiny-bert's example with the second row's last 12 tokens padding, so that masks matter."""
    ids, mask = inputs[0], inputs[1].clone()
    mask[-1, -12:] = 0
    return ids.expand(2, -1).clone(), mask.expand(2, -1).clone()


def _hidden(model, inputs):
    return eager(model, inputs).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit"])
def test_sdpa_swap_reproduces_the_model(kind):
    model, inputs = _tiny(kind)
    before = _hidden(model, inputs)
    assert dioe.rewrite.swap_attention(model, "sdpa") is model
    assert set(dioe.rewrite.swapped(model).values()) == {"sdpa"} and len(dioe.rewrite.swapped(model)) == 2
    assert_matches_eager(before, _hidden(model, inputs), rtol=1e-6, what=f"{kind} swapped to sdpa")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit"])
def test_linear_swap_changes_the_function_and_keeps_the_weights(kind):
    model, inputs = _tiny(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _hidden(model, inputs)
    dioe.rewrite.swap_attention(model, "linear")
    after = _hidden(model, inputs)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(after, before), "linear attention computes a different function from softmax"
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.set_attn_implementation("sdpa")  # transformers' own switch undoes the swap
    assert dioe.rewrite.swapped(model) == {}
    assert torch.equal(_hidden(model, inputs), before)


def _reference_linear(q, k, v, keep, causal):
    """Linear attention written quadratically: φ(q) φ(k)ᵀ masked, each row normalised by its sum."""
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)                    # (B, H, Tq, Tk)
    allowed = keep[:, None, None, :].expand_as(a)
    if causal:
        allowed = allowed & torch.ones(a.shape[-2:], dtype=torch.bool).tril()
    a = a * allowed
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_its_quadratic_form(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g) for _ in range(3))
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 7:] = False
    got = LinearAttention(chunk=4)(q, k, v, keep[:, None, None, :], causal=causal)  # chunks of 4, 4 and 3
    assert_matches_eager(_reference_linear(q, k, v, keep, causal), got, rtol=1e-5, what="linear attention")
    # a masked key contributes nothing, whatever its key and value
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 7:], v2[1, :, 7:] = 100.0, -100.0
    assert torch.equal(got, LinearAttention(chunk=4)(q, k2, v2, keep[:, None, None, :], causal=causal))


def test_linear_attention_with_a_full_mask_is_exact_and_warns():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    full = keep[:, None, None, :].expand(2, 1, 9, 9)
    import dioe.attention

    dioe.attention._warned_dense = False
    with pytest.warns(RuntimeWarning, match="full .query x key. mask"):
        got = LinearAttention()(q, k, v, full, causal=True)
    assert_matches_eager(_reference_linear(q, k, v, keep, True), got, rtol=1e-5, what="linear, full mask")


def test_standard_attention_folds_causality_into_a_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    keep = torch.tensor([[True] * 4 + [False] * 2])
    scores = (q @ k.transpose(-1, -2)) / 2
    allowed = keep[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    got = StandardAttention()(q, k, v, keep[:, None, None, :], causal=True, scale=None)
    assert_matches_eager(expected, got, rtol=1e-5, what="standard attention, causal and padded")


@pytest.mark.parametrize("spec", ["sdpa", "linear"])
def test_padding_is_honoured_in_bert(spec):
    model, (ids, mask) = _tiny("bert")
    dioe.rewrite.swap_attention(model, spec)
    other = ids.clone()
    other[-1, -12:] = 7  # the padded tokens change; what the real tokens see must not
    a, b = _hidden(model, (ids, mask)), _hidden(model, (other, mask))
    assert torch.equal(a[-1, :-12], b[-1, :-12])


@pytest.mark.parametrize("spec", ["sdpa", "linear"])
def test_causality_is_honoured_in_gpt2(spec):
    model, (ids,) = _tiny("gpt2")
    dioe.rewrite.swap_attention(model, LinearAttention(chunk=5) if spec == "linear" else spec)
    later = ids.clone()
    later[:, 10:] = 3  # tokens after position 9 change; positions 0..9 must not see it
    a, b = _hidden(model, (ids,)), _hidden(model, (later,))
    assert torch.allclose(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_swapped_linear_model_optimizes_and_matches_its_own_eager(pool):
    model, inputs = _tiny("bert")
    dioe.rewrite.swap_attention(model, "linear")
    expected = eager(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, inputs, hardware=pool, backends=["torch"], precision="fp32")
    assert_matches_eager(expected, opt(*inputs), rtol=1e-5, what="optimized linear tiny-bert")


def test_swapped_gpt2_captures_linear_with_a_padding_mask():
    model, (ids,) = _tiny("gpt2")
    dioe.rewrite.swap_attention(model, "linear")
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a padding mask, the capture keeps linear attention linear
        captured = dioe.capture(model, (ids, None, mask))
    assert_matches_eager(eager(model, (ids, None, mask)), captured(ids, None, mask), rtol=1e-5,
                         what="captured linear gpt2")


def test_unknown_mechanism_names_the_known_ones():
    model, _ = _tiny("bert")
    with pytest.raises(dioe.DIOEError, match=r"unknown attention mechanism 'flash'; known: 'sdpa', 'linear'"):
        dioe.rewrite.swap_attention(model, "flash")
    with pytest.raises(dioe.DIOEError, match=r"instance of LinearAttention, such as LinearAttention\(\)"):
        dioe.rewrite.swap_attention(model, LinearAttention)
    with pytest.raises(dioe.DIOEError, match=r"'sdpa', 'linear' or an AttentionMechanism instance; got int 3"):
        dioe.rewrite.swap_attention(model, 3)
    assert dioe.rewrite.swapped(model) == {}, "a refused swap changes nothing"


def test_model_without_attention_is_refused():
    model, _ = dioe.zoo.load("tiny-mlp")
    with pytest.raises(dioe.DIOEError, match="TinyMLP has no attention module to swap.*ALL_ATTENTION_FUNCTIONS"):
        dioe.rewrite.swap_attention(model, "linear")
    with pytest.raises(dioe.DIOEError, match="takes a torch.nn.Module; got str"):
        dioe.rewrite.swap_attention("bert", "linear")
    with pytest.raises(dioe.DIOEError, match="chunk must be an integer >= 1"):
        LinearAttention(chunk=0)


def test_custom_mechanism_is_called_with_heads_and_causality():
    seen = []

    class Recording(AttentionMechanism):
        name = "recording"

        def forward(self, q, k, v, mask, *, causal, scale):
            seen.append((tuple(q.shape), causal, None if mask is None else tuple(mask.shape)))
            return StandardAttention()(q, k, v, mask, causal=causal, scale=scale)

    model, (ids,) = _tiny("gpt2")
    dioe.rewrite.swap_attention(model, Recording())
    eager(model, (ids, None, torch.ones_like(ids)))
    assert seen == [((2, 4, 16, 16), True, (2, 1, 1, 16))] * 2


@pytest.mark.models
@pytest.mark.parametrize("name", ["bert-base", "gpt2", "vit-base", "minilm"])
def test_zoo_transformers_swap_in_place(name, zoo_size):
    model, inputs = dioe.zoo.load(name, size=zoo_size)
    model.eval()
    before = _hidden(model, inputs)
    dioe.rewrite.swap_attention(model, "sdpa")
    assert_matches_eager(before, _hidden(model, inputs), rtol=1e-5, what=f"{name} swapped to sdpa")
    dioe.rewrite.swap_attention(model, "linear")
    after = _hidden(model, inputs)
    assert after.shape == before.shape and torch.isfinite(after).all()
