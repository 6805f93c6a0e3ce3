"""Change a model the way one changes code, without editing its source: swap its attention mechanism in place.

    >>> import dioe, dioe.rewrite
    >>> model, inputs = dioe.zoo.load("tiny-bert")                          # doctest: +SKIP
    >>> dioe.rewrite.swap_attention(model, "linear")                        # doctest: +SKIP
    >>> sorted(set(dioe.rewrite.swapped(model).values()))                   # doctest: +SKIP
    ['linear']
    >>> fast = dioe.optimize(model, inputs)                                 # doctest: +SKIP

How: transformers models (BERT, GPT-2, ViT, MiniLM and most others since transformers 4.48) do not compute
attention in their modules; each attention module looks up a function by its config's `_attn_implementation` in
`ALL_ATTENTION_FUNCTIONS`, and the model builds its mask through the matching entry of
`ALL_MASK_ATTENTION_FUNCTIONS`. DIOE registers one entry, "dioe", in both tables. Its attention function calls the
mechanism stored on the calling module (`module.dioe_attention`), so each model (even each layer) carries its
own; its mask function hands a padding-only mask over as (B, 1, 1, Tk) with causality as a flag, which linear
attention can fold into its sums, and any other pattern (sliding windows, cache offsets, packed sequences) as
the full boolean (B, 1, Tq, Tk) mask that transformers' own SDPA path builds.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .attention import AttentionMechanism, LinearAttention, StandardAttention
from .errors import DIOEError

IMPLEMENTATION = "dioe"  # the name registered in transformers' attention and mask tables
ATTRIBUTE = "dioe_attention"  # where a swapped module keeps its mechanism

MECHANISMS: dict[str, Callable[[], AttentionMechanism]] = {"sdpa": StandardAttention, "linear": LinearAttention}


def _known() -> str:
    return ", ".join(repr(n) for n in MECHANISMS)


def mechanism(spec: str | AttentionMechanism) -> AttentionMechanism:
    """The mechanism `spec` names ("sdpa", "linear"), or `spec` itself when it is an AttentionMechanism."""
    if isinstance(spec, AttentionMechanism):
        return spec
    if isinstance(spec, str):
        if spec in MECHANISMS:
            return MECHANISMS[spec]()
        raise DIOEError(f"unknown attention mechanism {spec!r}; known: {_known()}, or an AttentionMechanism "
                        "instance (dioe.attention.AttentionMechanism)")
    if isinstance(spec, type) and issubclass(spec, AttentionMechanism):
        raise DIOEError(f"pass an instance of {spec.__name__}, such as {spec.__name__}(), not the class")
    raise DIOEError(f"the attention mechanism must be one of {_known()} or an AttentionMechanism instance; got "
                    f"{type(spec).__name__} {spec!r}")


def _dispatches_attention(module: torch.nn.Module) -> bool:
    """True for a module whose forward looks its attention up in transformers' ALL_ATTENTION_FUNCTIONS by its
    config: that lookup is the seam a swap uses, so it is what makes a module swappable."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return (code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module path: module} for every attention module of `model` that a swap reaches."""
    return {name: m for name, m in model.named_modules() if _dispatches_attention(m)}


def swapped(model: torch.nn.Module) -> dict[str, str]:
    """{module path: mechanism name} for the attention modules of `model` that run a swapped-in mechanism (a
    module whose config was set back to another implementation runs that one, and is left out)."""
    return {name: getattr(m, ATTRIBUTE).name for name, m in attention_modules(model).items()
            if getattr(m, ATTRIBUTE, None) is not None and m.config._attn_implementation == IMPLEMENTATION}


def swap_attention(model: torch.nn.Module, spec: str | AttentionMechanism) -> torch.nn.Module:
    """Make every attention module of `model` compute attention with `spec`: "sdpa" (standard softmax
    attention, the function the model had), "linear" (linear attention, a different function, linear in
    sequence length) or any AttentionMechanism instance. Changes `model` in place and returns it; weights,
    state dict and module tree stay as they were, and the model captures and optimizes like any other.

        >>> model, inputs = dioe.zoo.load("gpt2", size="small")             # doctest: +SKIP
        >>> dioe.rewrite.swap_attention(model, dioe.attention.LinearAttention(chunk=64))  # doctest: +SKIP

    Raises DIOEError for an unknown mechanism, or a model with no attention module to swap."""
    if not isinstance(model, torch.nn.Module):
        raise DIOEError(f"swap_attention takes a torch.nn.Module; got {type(model).__name__}")
    chosen = mechanism(spec)
    found = attention_modules(model)
    if not found:
        raise DIOEError(f"{type(model).__name__} has no attention module to swap: swap_attention reaches "
                        "transformers models whose attention modules dispatch through ALL_ATTENTION_FUNCTIONS by "
                        "config._attn_implementation (BERT, GPT-2, ViT, MiniLM and most models of transformers >= "
                        "4.48); modules that compute attention in their own code cannot be swapped without editing it")
    _register()
    configs = {}
    for m in found.values():
        setattr(m, ATTRIBUTE, chosen)
        configs[id(m.config)] = m.config
    for config in configs.values():
        config._attn_implementation = IMPLEMENTATION  # the model builds its masks through the same entry
    return model


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attend)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)
    _registered = True


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
            is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, T, D) heads in, (B, Tq, H, Dv) out and no weights."""
    chosen = getattr(module, ATTRIBUTE, None)
    if chosen is None:
        raise DIOEError(f"{type(module).__name__}'s config asks for attention implementation {IMPLEMENTATION!r}, "
                        "but the module carries no mechanism: swap the model that holds it with "
                        "dioe.rewrite.swap_attention, or set config._attn_implementation back to 'sdpa'")
    for unsupported in ("position_bias", "softcap", "sinks", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise DIOEError(f"{type(module).__name__} passes {unsupported!r} to its attention, which DIOE's "
                            f"mechanisms do not take; this model cannot run with a swapped {chosen.name!r} attention")
    if dropout:
        raise DIOEError(f"{type(module).__name__} asks for attention dropout {dropout}: a swapped attention runs "
                        "inference only; call model.eval() first")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    out = chosen(query, key, value, attention_mask, causal=causal, scale=scaling)  # (B, H, Tq, Dv)
    return out.transpose(1, 2).contiguous(), None


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
          attention_mask: torch.Tensor | None = None, local_size: int | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' mask-function signature. A plain causal or bidirectional pattern over one sequence, with or
    without padding, becomes the padding alone, (B, 1, 1, Tk) or None, and the attention module's `is_causal`
    adds causality; anything else becomes the full (B, 1, Tq, Tk) boolean mask."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask, sdpa_mask)

    plain = mask_function is bidirectional_mask_function or (mask_function is causal_mask_function
                                                               and q_length == kv_length)
    if plain and local_size is None and _is_zero(q_offset) and _is_zero(kv_offset):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return None if padding is None else padding[:, None, None, :kv_length]  # (B, 1, 1, Tk)
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
