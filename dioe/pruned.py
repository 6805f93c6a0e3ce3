"""A pruned model on disk: its weights as safetensors and a JSON manifest (the dense architecture, every tensor's
shape, the attributes that changed), from which `load_stage` rebuilds it without torch-pruning.

    >>> from dioe.pruned import load_stage
    >>> model = load_stage("pruned/stage-3")        # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DIOEError
from .files import private_dir, write_bytes, write_text

STAGE_FORMAT = 1   # stage.json's layout; a reader refuses another


def architecture(model: torch.nn.Module, zoo_name: str | None, size: str) -> dict:
    """How to build the dense model again: a transformers class and its config, or a zoo name."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        return {"transformers": type(model).__name__, "config": config.to_dict()}
    if zoo_name is None:
        raise DIOEError(f"a pruned {type(model).__name__} cannot be saved to reload: it is neither a transformers "
                        "model nor a zoo model")
    return {"zoo": zoo_name, "size": size}


def _changed_attributes(model: torch.nn.Module, dense: torch.nn.Module) -> dict[str, dict]:
    """Integer and shape attributes (in_features, num_attention_heads, normalized_shape, ...) that differ from the
    dense model's, per module: what a forward reads besides the weights."""
    out: dict[str, dict] = {}
    dense_mods = dict(dense.named_modules())
    for name, m in model.named_modules():
        d = dense_mods.get(name)
        for k, v in vars(m).items():
            shaped = isinstance(v, int) and not isinstance(v, bool) or \
                isinstance(v, tuple) and v and all(isinstance(i, int) for i in v)
            if shaped and d is not None and getattr(d, k, None) != v:
                out.setdefault(name, {})[k] = list(v) if isinstance(v, tuple) else v
    return out


def save_stage(folder: Path, model: torch.nn.Module, dense: torch.nn.Module, arch: dict, info: dict) -> Path:
    """The stage's weights as safetensors and its manifest as JSON: the dense architecture, every tensor's shape and
    the attributes that changed, from which `load_stage` rebuilds it."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    folder = Path(folder)
    private_dir(folder)
    write_bytes(folder / "model.safetensors", save(state))
    manifest = {"format": STAGE_FORMAT, "architecture": arch, "shapes": {k: list(v.shape) for k, v in state.items()},
                "attributes": _changed_attributes(model, dense), **info}
    write_text(folder / "stage.json", json.dumps(manifest, indent=1, default=str))
    return folder


def _build_dense(arch: dict) -> torch.nn.Module:
    if "transformers" in arch:
        from .zoo import _need_transformers

        tf = _need_transformers()
        cls = getattr(tf, arch["transformers"], None)
        if cls is None or not hasattr(cls, "config_class"):
            raise DIOEError(f"stage architecture names {arch['transformers']!r}, which transformers lacks")
        return cls(cls.config_class.from_dict(arch["config"]))
    from . import zoo

    return zoo.load(arch["zoo"], size=arch["size"])[0]


def load_stage(folder: str | Path) -> torch.nn.Module:
    """A saved stage as an nn.Module in eval mode, rebuilt from its manifest: the dense architecture, each tensor
    resized to its saved shape, each changed attribute set, then the weights loaded strictly. torch-pruning is not
    needed.

        >>> model = load_stage("pruned/stage-3")        # doctest: +SKIP
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "stage.json").read_text())
    except FileNotFoundError:
        raise DIOEError(f"{folder} is not a saved pruning stage: it has no stage.json") from None
    if manifest.get("format") != STAGE_FORMAT:
        raise DIOEError(f"{folder / 'stage.json'} has format {manifest.get('format')!r}; this DIOE reads "
                        f"{STAGE_FORMAT}")
    model = _build_dense(manifest["architecture"])
    for key, shape in manifest["shapes"].items():
        owner, _, leaf = key.rpartition(".")
        m = model.get_submodule(owner)
        old = getattr(m, leaf)
        if list(old.shape) != shape:
            new = torch.empty(shape, dtype=old.dtype)
            if leaf in m._parameters:
                m._parameters[leaf] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                m._buffers[leaf] = new
    for name, attrs in manifest["attributes"].items():
        m = model.get_submodule(name)
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval()


__all__ = ["STAGE_FORMAT", "architecture", "load_stage", "save_stage"]
