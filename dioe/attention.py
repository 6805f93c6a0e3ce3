"""Attention mechanisms that `dioe.rewrite.swap_attention` puts into a model: one small interface, a standard
implementation and a linear one.

Every mechanism takes the heads already split, `q` (B, H, Tq, D), `k` (B, H, Tk, D), `v` (B, H, Tk, Dv), and
returns (B, H, Tq, Dv). `mask` is None or a boolean tensor that broadcasts to (B, H, Tq, Tk), True where a query
may attend a key: (B, 1, 1, Tk) for padding alone, (B, 1, Tq, Tk) where a model built a full pattern. `causal`
says that query i sees only keys up to i (aligned to the last key, as in decoding with a cache); it holds on top
of `mask`. `scale` is the model's own softmax scale.

    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 5, 4)
    >>> tuple(LinearAttention()(q, k, v, None, causal=True).shape)
    (1, 2, 5, 4)
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from .errors import DIOEError


class AttentionMechanism(abc.ABC):
    """What a swapped attention module calls: `mechanism(q, k, v, mask, causal=..., scale=...)`.

    A subclass sets `name` and implements `forward`; it holds no parameters, so a swap leaves the model's weights
    and state dict as they were."""

    name: str = ""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                 causal: bool = False, scale: float | None = None) -> torch.Tensor:
        return self.forward(q, k, v, mask, causal=causal, scale=scale)

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                causal: bool, scale: float | None) -> torch.Tensor:
        """(B, H, Tq, Dv): each query's mix of the values of the keys it may attend."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def causal_pattern(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may see key j: j <= i + (Tk - Tq), the last query seeing every key."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


class StandardAttention(AttentionMechanism):
    """softmax(q kᵀ · scale + mask) v through torch's `scaled_dot_product_attention`: the function the models
    compute unswapped, memory quadratic in sequence length wherever a mask or the math kernel is used."""

    name = "sdpa"

    def forward(self, q, k, v, mask, *, causal, scale):
        tq, tk = q.shape[-2], k.shape[-2]
        if causal and (mask is not None or tq != tk):
            # SDPA takes is_causal only without a mask, and aligns it to the first key; fold causality into the mask
            pattern = causal_pattern(tq, tk, q.device)
            if mask is None:
                mask = pattern
            elif mask.dtype == torch.bool:
                mask = mask & pattern
            else:
                mask = mask.masked_fill(~pattern, torch.finfo(mask.dtype).min)
            causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class LinearAttention(AttentionMechanism):
    """Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"): the softmax kernel exp(q·k) is
    replaced by φ(q)·φ(k) with φ(x) = elu(x) + 1, so that Σⱼ φ(kⱼ) vⱼᵀ is summed once and shared by every query.
    Time and memory grow linearly with sequence length, not quadratically. It computes a different function from
    softmax attention: a model trained with softmax gives different outputs after the swap.

    - Masked keys get φ(k) = 0, so they add nothing to the numerator or the normaliser.
    - Causal attention runs in chunks of `chunk` queries: exact (quadratic) inside a chunk, a running sum of
      φ(k) vᵀ across chunks, so memory stays linear. The chunk loop unrolls when captured (Tk / chunk steps).
    - The softmax scale does not apply (there is no softmax); `scale` is ignored.
    - A dense (B, ·, Tq, Tk) mask cannot be folded into the shared sums: such masks are applied to the (Tq, Tk)
      matrix φ(q) φ(k)ᵀ instead, which is exact but quadratic in memory, and DIOE warns once.
    - Sums run in float32 for half-precision inputs, where Σ φ(k) over thousands of keys would overflow fp16.
    """

    name = "linear"

    def __init__(self, *, chunk: int = 128, eps: float = 1e-6):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise DIOEError(f"LinearAttention chunk must be an integer >= 1 (queries per causal chunk); got {chunk!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise DIOEError(f"LinearAttention eps must be a number > 0 (guards the normaliser); got {eps!r}")
        self.chunk, self.eps = chunk, float(eps)

    def __repr__(self) -> str:
        return f"LinearAttention(chunk={self.chunk}, eps={self.eps})"

    def forward(self, q, k, v, mask, *, causal, scale):
        if mask is not None and mask.dtype != torch.bool:
            raise DIOEError("linear attention takes a boolean mask (True where a query may attend a key); got an "
                            f"additive {mask.dtype} mask, which it cannot fold into φ(k) without changing it")
        out_dtype = q.dtype
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        # in place where the tensor is our own: at long sequences these (B, H, T, D) temporaries are the peak
        fq, fk, v = F.elu(q.to(work)).add_(1), F.elu(k.to(work)).add_(1), v.to(work)  # (B, H, T, D), all > 0
        if mask is not None and mask.shape[-2] == 1:
            fk.mul_(mask.transpose(-1, -2))  # (B, 1|H, Tk, 1): a masked key's φ is zero
            mask = None
        if mask is not None:
            _warn_dense()
            out = self._dense(fq, fk, v, mask, causal)
        elif causal:
            out = self._causal(fq, fk, v)
        else:
            kv = fk.transpose(-1, -2) @ v                          # (B, H, D, Dv)
            z = fk.sum(dim=-2).unsqueeze(-1)                       # (B, H, D, 1)
            del fk
            out = (fq @ kv).div_((fq @ z).add_(self.eps))          # (B, H, Tq, Dv) / (B, H, Tq, 1)
        return out.to(out_dtype)

    def _dense(self, fq, fk, v, mask, causal):
        a = fq @ fk.transpose(-1, -2)                              # (B, H, Tq, Tk)
        if causal:
            mask = mask & causal_pattern(fq.shape[-2], fk.shape[-2], fq.device)
        a = a * mask.to(a.dtype)
        return (a @ v) / (a.sum(dim=-1, keepdim=True) + self.eps)

    def _causal(self, fq, fk, v):
        tq, tk = fq.shape[-2], fk.shape[-2]
        # keys before the first query's own position are seen by every query: they start the running sums
        past = tk - tq
        if past < 0:
            raise DIOEError(f"causal attention needs at least as many keys as queries; got {tq} queries, {tk} keys")
        kv = torch.einsum("bhkd,bhke->bhde", fk[..., :past, :], v[..., :past, :])  # (B, H, D, Dv)
        z = fk[..., :past, :].sum(dim=-2)                                            # (B, H, D)
        outs = []
        for start in range(0, tq, self.chunk):
            stop = min(start + self.chunk, tq)
            q_c = fq[..., start:stop, :]                                             # (B, H, c, D)
            k_c, v_c = fk[..., past + start:past + stop, :], v[..., past + start:past + stop, :]
            a = (q_c @ k_c.transpose(-1, -2)).tril()                                 # (B, H, c, c)
            num = a @ v_c + q_c @ kv                                                 # (B, H, c, Dv)
            den = a.sum(dim=-1) + torch.einsum("bhqd,bhd->bhq", q_c, z)              # (B, H, c)
            outs.append(num / (den.unsqueeze(-1) + self.eps))
            kv = kv + k_c.transpose(-1, -2) @ v_c
            z = z + k_c.sum(dim=-2)
        return torch.cat(outs, dim=-2)


_warned_dense = False


def _warn_dense() -> None:
    import warnings

    global _warned_dense
    if not _warned_dense:
        _warned_dense = True
        warnings.warn("dioe: linear attention was given a full (query x key) mask, so it applies it to the "
                      "(Tq, Tk) matrix φ(q) φ(k)ᵀ: exact, but memory grows with the square of the sequence length, "
                      "as with standard attention. A padding-only mask (B, 1, 1, Tk) keeps it linear.",
                      RuntimeWarning, stacklevel=3)
