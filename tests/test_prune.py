"""Progressive pruning: stages shrink, reload without torch-pruning to the same outputs bit for bit, and bad options
get errors that say what is allowed."""

import json
import sys
import warnings

import pytest
import torch

import dioe
from dioe.accuracy import Budget
from dioe.errors import DIOEError
from dioe.prune import architecture, dense_head_counts, dense_widths, load_stage, prune_stage, save_stage
from dioe.prune_report import PruneResult

pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")


def tiny_resnet():
    """A two-stage bottleneck ResNet from a transformers config, small enough to prune in seconds."""
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
                                    num_labels=10)
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(cfg).eval(), (torch.randn(2, 3, 32, 32),)


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in (out.values() if hasattr(out, "values") else [out]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("strategy", ["l2", "taylor"])
def test_a_pruned_cnn_reloads_without_torch_pruning_and_matches_exactly(tmp_path, monkeypatch, strategy):
    model, inputs = tiny_resnet()
    dense = tiny_resnet()[0]
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}

    def gradients():
        model(*inputs).logits.square().mean().backward()
    prune_stage(model, inputs, keep_before=1.0, keep_after=0.5, strategy=strategy, dense_heads={}, gradients=gradients)
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert sum(after.values()) < sum(before.values())
    assert model.classifier[-1].out_features == 10      # the classifier keeps its classes
    save_stage(tmp_path / "s", model, dense, architecture(model, None, "full"), {"stage": 1})
    monkeypatch.setitem(sys.modules, "torch_pruning", None)   # any import of it now fails
    reloaded = load_stage(tmp_path / "s")
    for got, want in zip(_outputs(reloaded, inputs), _outputs(model, inputs)):
        assert torch.equal(got, want)
    assert {n: m.out_channels for n, m in reloaded.named_modules() if isinstance(m, torch.nn.Conv2d)} == after


def test_channels_are_rounded_from_the_dense_widths_at_every_stage():
    """Each stage keeps round(dense width x kept fraction) to the nearest multiple of 8 (at least 8), measured from
    the dense model each time, so three stages end where one cut to the same fraction would."""
    model, inputs = tiny_resnet()
    dense = dense_widths(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    keep = 1.0
    for after in (0.8, 0.65, 0.5):
        prune_stage(model, inputs, keep_before=keep, keep_after=after, strategy="magnitude", dense_heads={},
                    round_to=8, dense_widths=dense)
        keep = after
    got = dense_widths(model)
    # the stem's 16 and each block's output width are tied to ones that stay; every cut layer lands on the rule
    cut = [n for n in convs if got[n] != dense[n]]
    assert cut, got
    for n in cut:
        assert got[n] == max(8, round(dense[n] * 0.5 / 8) * 8), (n, dense[n], got[n])
    exact, _ = tiny_resnet()
    prune_stage(exact, inputs, keep_before=1.0, keep_after=0.65, strategy="magnitude", dense_heads={})
    assert any(w % 8 for n, w in dense_widths(exact).items() if n in convs), "without rounding, odd counts remain"


def test_tiny_bert_prunes_in_stages_and_each_stage_reloads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dioe.prune("tiny-bert", target_sparsity=0.5, steps=2, output_dir=tmp_path, calibration=8,
                            budget=Budget(cosine=0.99, samples=16), batches=(), log=lambda _: None)
    params = [s.params for s in result.stages]
    assert len(params) == 3 and params[0] > params[1] > params[2]
    assert result.stages[-1].sparsity == pytest.approx(0.5, abs=0.05)
    assert result.stages[0].agreement["cosine"]["value"] == pytest.approx(1.0)
    for name in ("pruning.csv", "pruning.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert PruneResult.from_dict(json.loads((tmp_path / "pruning.json").read_text())) == result
    assert len((tmp_path / "pruning.csv").read_text().splitlines()) == 4
    # stage 2 of 2: half the heads and half the MLP channels of every layer, the hidden size kept
    model = load_stage(tmp_path / "stage-2")
    assert set(dense_head_counts(model).values()) == {2}
    for layer in model.encoder.layer:
        assert layer.attention.self.query.out_features == 32 and layer.intermediate.dense.out_features == 64
        assert layer.output.dense.out_features == 64
    ids, mask = dioe.zoo.load("tiny-bert")[1]
    assert model(ids, mask).last_hidden_state.shape == (1, 32, 64)


def test_a_module_is_pruned_with_its_own_inputs(tmp_path):
    model, inputs = tiny_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dioe.prune(model, inputs, target_sparsity=0.3, steps=1, strategy="taylor", recover_steps=2,
                            output_dir=tmp_path, calibration=4, budget="top1>=0.5, samples=8", batches=(),
                            log=lambda _: None)
    stage = result.stages[1]
    assert stage.params < result.stages[0].params and stage.macs < result.stages[0].macs
    assert stage.recovery["steps"] == 2 and "top1" in stage.agreement
    assert load_stage(tmp_path / stage.path).classifier[-1].out_features == 10


@pytest.mark.parametrize("kwargs, words", [
    ({"target_sparsity": 0}, "(0, 1)"), ({"target_sparsity": 1.0}, "(0, 1)"), ({"target_sparsity": "half"}, "(0, 1)"),
    ({"target_sparsity": 0.5, "strategy": "random"}, "magnitude, l2, taylor"),
    ({"target_sparsity": 0.5, "steps": 0}, "steps must be an integer >= 1"),
])
def test_bad_options_say_what_is_allowed(tmp_path, kwargs, words):
    with pytest.raises(DIOEError, match=None) as e:
        dioe.prune("tiny-bert", output_dir=tmp_path, **kwargs)
    assert words in str(e.value)


@pytest.mark.parametrize("name, words", [("gpt2", "cannot prune 'gpt2'; prunable zoo models: bert-base"),
                                         ("bert-huge", "'bert-huge' (not a zoo model)")])
def test_a_model_that_cannot_be_pruned_is_named_with_the_allowed_ones(tmp_path, name, words):
    with pytest.raises(DIOEError) as e:
        dioe.prune(name, target_sparsity=0.5, output_dir=tmp_path)
    assert words in str(e.value) and "tiny-bert" in str(e.value)


def test_the_cli_and_the_seed_tool_reject_bad_input_with_a_message(tmp_path, capsys):
    from dioe.cli import main

    assert main(["prune", "tiny-bert", "--target-sparsity", "1.5", "--output-dir", str(tmp_path)]) == 2
    assert "target sparsity must be a number in (0, 1)" in capsys.readouterr().err
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    try:
        import prune as tool
    finally:
        sys.path.pop(0)
    assert tool.main(["--model", "resnet50", "--target-sparsity", "0.5", "--pruning-strategy", "random",
                      "--output-dir", str(tmp_path)]) == 2
    assert "allowed: magnitude, l2, taylor" in capsys.readouterr().err


@pytest.mark.models
def test_each_stage_is_optimized_and_timed_by_dioe(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dioe.prune("tiny-bert", target_sparsity=0.5, steps=1, output_dir=tmp_path, calibration=8,
                            budget=Budget(cosine=0.99, samples=16), batches=(1,), backends=["onnxruntime"],
                            timing_s=0.5, log=lambda _: None)
    assert all(s.latency_ms["1"] > 0 for s in result.stages)
    assert result.fits is not None
