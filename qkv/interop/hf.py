"""qkv as an attention backend of Hugging Face transformers: `attn_implementation="qkv"`.

    import qkv.interop.hf
    qkv.interop.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qkv")

`register()` adds two functions under one name: `attention_forward` to transformers'
`AttentionInterface` (the attention of every layer) and `mask_for` to its
`AttentionMaskInterface` (the mask a model builds once per forward and hands to its layers).

The mask is a description, not a matrix. transformers builds a mask from a composed mask function
(causal, sliding window, bidirectional, packed sequences) plus the 2-D padding mask, at query
positions q_offset + i and key positions kv_offset + j. `mask_for` recognises those functions
and returns a `MaskSpec`: causal and window in qkv's bottom-right terms, the keys to keep
(StaticCache's unwritten tail is cut off as a view), the padding as kv_lengths (right padding)
or a (B, 1, 1, Lk) bool view, and cu_seqlens for packed rows. No (Lq, Lk) matrix is ever built,
so the memory of a forward stays linear in the sequence length on backends that are linear.
A mask function it does not recognise (image tokens, chunked attention, custom `or`/`and`
functions) falls back to transformers' own dense bool mask, shaped (B, 1, Lq, Lk).

`attention_forward` takes transformers' layout, q (B, Hq, Lq, D), k and v (B, Hk, Lk, D),
calls `qkv.attention` with grouped-query heads as they are (K/V are never repeated), and
returns (B, Lq, Hq, Dv) as transformers expects. A `MaskSpec` is trusted as given; a 4-D bool
tensor mask is passed as `mask` and a float one (0 / large negative) as `bias`, both
unexpanded. Without a mask, `is_causal` (or the module's) applies, aligned top-left as in
transformers' sdpa integration. Rows that see no key (left padding under a causal mask) are
zeros here, where eager attention averages every value; no real token reads them.
Attention sinks (`s_aux`, gpt-oss) fold in exactly through the lse. `output_attentions` returns
the weights from `qkv.attention_weights` (quadratic, for inspection).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qkv.attention import attention, attention_varlen, attention_weights
from qkv.attention import registry as _registry

NAME = "qkv"


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Who may attend, for calls with q (B, ., Lq, .) and k (B, ., kv_length, .), in qkv's terms.

    Only the first `keys` keys take part (None: all); causal, window, kv_lengths and mask then
    mean what they mean for `qkv.attention` on those keys. `cu_seqlens` (int64 offsets into the
    B * Lq packed rows) marks packed sequences, each attending only within itself.
    `shape` and `ndim` let transformers pass a MaskSpec around where it expects a 4-D mask.
    """

    batch_size: int
    q_length: int
    kv_length: int
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    keys: int | None = None
    kv_lengths: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def keywords(self) -> dict:
        """The visibility keywords of `qkv.attention` (of `attention_varlen` when packed)."""
        out = dict(causal=self.causal, window=self.window)
        if self.cu_seqlens is None:
            out.update(kv_lengths=self.kv_lengths, mask=self.mask)
        return out


# -- recognising transformers' mask functions ---------------------------------------------------

@functools.cache
def _mask_utils():
    from transformers import masking_utils

    return masking_utils


def _cells(fn) -> dict:
    code = fn.__code__
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()),
                    strict=True))


@functools.cache
def _codes() -> dict:
    """The code object of each closure factory's inner function; every closure shares it."""
    mu = _mask_utils()
    probe = torch.zeros(1, 1, dtype=torch.long)
    return {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "sliding_bidirectional": mu.sliding_window_bidirectional_overlay(1).__code__,
        "remap": mu.remap_positions_for_packed_sequence(mu.causal_mask_function, probe).__code__,
        "packed": mu.packed_sequence_mask_function(probe).__code__,
    }


@dataclass
class _Pattern:
    """kv - q <= right and kv - q >= -left (None: unbounded), in transformers' absolute indices;
    `remapped` and `packed_ids` record packed sequences."""

    left: int | None = None
    right: int | None = None
    remapped: bool = False
    packed_ids: torch.Tensor | None = None

    def bound(self, left: int | None = None, right: int | None = None) -> _Pattern:
        def tighter(a, b):
            return b if a is None else a if b is None else min(a, b)

        self.left, self.right = tighter(self.left, left), tighter(self.right, right)
        return self


def _pattern(fn, codes: dict, pattern: _Pattern) -> _Pattern | None:
    """Narrow `pattern` by mask function `fn`, or None when `fn` is not one qkv can describe."""
    mu = _mask_utils()
    if fn is mu.causal_mask_function:
        return pattern.bound(right=0)
    if fn is mu.bidirectional_mask_function:
        return pattern
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return None
    cells = _cells(fn)
    if code is codes["and"]:
        for part in cells["mask_functions"]:
            if _pattern(part, codes, pattern) is None:
                return None
        return pattern
    if code is codes["sliding"]:  # kv > q - w
        return pattern.bound(left=cells["sliding_window"] - 1)
    if code is codes["sliding_bidirectional"]:  # |q - kv| <= w
        return pattern.bound(left=cells["sliding_window"], right=cells["sliding_window"])
    if code is codes["remap"] and not pattern.remapped:
        pattern.remapped = True
        return _pattern(cells["mask_function"], codes, pattern)
    if code is codes["packed"] and pattern.packed_ids is None:
        pattern.packed_ids = cells["packed_sequence_mask"]
        return pattern
    return None


# -- the mask function ------------------------------------------------------------------------

def _padding(attention_mask, keep: int, kv_offset: int, B: int):
    """(kv_lengths, mask) for the 2-D padding mask over keys kv_offset .. kv_offset + keep."""
    if attention_mask is None:
        return None, None
    pad = attention_mask.to(torch.bool)
    if pad.shape[-1] < kv_offset + keep:  # transformers pads the 2-D mask with False likewise
        pad = torch.nn.functional.pad(pad, (0, kv_offset + keep - pad.shape[-1]))
    pad = pad[:, kv_offset:kv_offset + keep].expand(B, keep)
    if bool(pad.all()):
        return None, None
    lengths = pad.sum(-1)
    prefix = torch.arange(keep, device=pad.device) < lengths.unsqueeze(-1)
    if bool((prefix == pad).all()):  # right padding: a length per row
        return lengths, None
    return None, pad[:, None, None, :]


def _cu_seqlens(ids: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """int64 offsets of the packed sequences of `ids` (B, L) sequence numbers, row by row."""
    rows = torch.arange(B, device=ids.device).unsqueeze(1) * (L + 1)
    _, counts = torch.unique_consecutive((ids.expand(B, L) + rows).reshape(-1),
                                         return_counts=True)
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0))


def _causal_window(left: int | None, right: int | None, Lq: int) -> dict:
    """qkv's causal and window for i' - left <= j <= i' + right (None: unbounded)."""
    if Lq == 1 and right == 0:  # one query, the newest: causal hides nothing
        right = None
    causal = right == 0
    if left is None and (right is None or causal):
        return dict(causal=causal, window=None)
    return dict(causal=causal, window=(left, None if causal else right))


def _spec(pattern: _Pattern, B, Lq, Lk, q_offset, kv_offset, attention_mask) -> MaskSpec | None:
    if pattern.remapped or pattern.packed_ids is not None:
        if not (pattern.remapped and pattern.packed_ids is not None and attention_mask is None
                and q_offset == 0 and kv_offset == 0 and Lq == Lk):
            return None
        return MaskSpec(B, Lq, Lk, **_causal_window(pattern.left, pattern.right, Lq),
                        cu_seqlens=_cu_seqlens(pattern.packed_ids, B, Lq))
    # qkv aligns i' = i + Lk - Lq; transformers' query i sits at q_offset + i - kv_offset there.
    keep = Lk
    if pattern.right is not None:  # keys past the last query's reach never take part
        keep = max(0, min(Lk, Lq + q_offset - kv_offset + pattern.right))
    shift = q_offset - kv_offset - (keep - Lq)
    left = None if pattern.left is None else pattern.left - shift
    right = None if pattern.right is None else pattern.right + shift
    if (left is not None and left < 0) or (right is not None and right < 0):
        return None
    kv_lengths, mask = _padding(attention_mask, keep, kv_offset, B)
    return MaskSpec(B, Lq, Lk, **_causal_window(left, right, Lq), keys=None if keep == Lk else keep,
                    kv_lengths=kv_lengths, mask=mask)


def mask_for(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
             mask_function=None, attention_mask=None, **kwargs):
    """transformers' mask-interface function for "qkv": a `MaskSpec`, or a dense (B, 1, Lq, Lk)
    bool mask for a mask function qkv cannot describe. A mask already built (a `MaskSpec` made
    ahead by `generate`) is returned as it is."""
    if isinstance(attention_mask, MaskSpec):
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(
                f"attention_mask: a qkv MaskSpec of shape {attention_mask.shape} does not fit "
                f"(batch, 1, q_length, kv_length) = {(batch_size, 1, q_length, kv_length)}")
        return attention_mask
    mu = _mask_utils()
    mask_function = mask_function or mu.causal_mask_function
    q_offset = int(q_offset)  # StaticCache passes a 0-d tensor
    pattern = _pattern(mask_function, _codes(), _Pattern())
    spec = None if pattern is None else _spec(
        pattern, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
    if spec is not None:
        return spec
    return mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))


# -- the attention function -------------------------------------------------------------------

# Keywords transformers may pass that qkv cannot honour, with why.
UNSUPPORTED = {
    "head_mask": "per-head masks of the weights",
    "score_mod": "flex attention's score_mod functions",
}


def _refuse(kwargs: dict) -> None:
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the qkv attention backend does not support {what} "
                                      f"({name!r})")


def _check_spec(spec: MaskSpec, q, k) -> None:
    want = (q.shape[0], 1, q.shape[2], k.shape[2])
    if spec.shape != want:
        raise ValueError(f"attention_mask: a qkv MaskSpec of shape {spec.shape} does not fit "
                         f"query {tuple(q.shape)} and key {tuple(k.shape)}, which need {want}")


def _visibility(module, query, key, value, attention_mask, kwargs):
    """(key, value, keywords, cu_seqlens) for the mask transformers passed."""
    kw, cu = {}, None
    if isinstance(attention_mask, MaskSpec):
        _check_spec(attention_mask, query, key)
        if attention_mask.keys is not None:
            key, value = key[:, :, :attention_mask.keys], value[:, :, :attention_mask.keys]
        kw, cu = attention_mask.keywords(), attention_mask.cu_seqlens
    elif attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        Lq = query.shape[2]
        if is_causal and Lq > 1:  # top-left, as transformers' sdpa: keys past Lq are not seen
            key, value = key[:, :, :Lq], value[:, :, :Lq]
            kw["causal"] = True
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        kw["mask"] = attention_mask
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype.is_floating_point:
        kw["bias"] = attention_mask
    else:
        raise NotImplementedError(
            "the qkv attention backend takes a qkv MaskSpec, a bool or float tensor mask or None "
            f"as attention_mask, got {type(attention_mask).__name__}")
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias[..., :key.shape[2]]
        kw["bias"] = bias if kw.get("bias") is None else kw["bias"] + bias
    return key, value, kw, cu


def _attend(query, key, value, cu, keywords):
    """(out (B, Lq, Hq, Dv), lse (B, Hq, Lq) or None)."""
    B, Hq, Lq, _ = query.shape
    if cu is None:
        res = attention(query, key, value, **keywords)
        out, lse = res if keywords.get("return_lse") else (res, None)
        return out.transpose(1, 2), lse

    def rows(x):  # (B, H, L, D) -> (B * L, H, D)
        return x.transpose(1, 2).reshape(B * x.shape[2], x.shape[1], x.shape[3])

    res = attention_varlen(rows(query), rows(key), rows(value), cu, cu, **keywords)
    out, lse = res if keywords.get("return_lse") else (res, None)
    if lse is not None:
        lse = lse.reshape(B, Lq, Hq).transpose(1, 2)
    return out.reshape(B, Lq, Hq, out.shape[-1]), lse


def _with_sinks(out, lse, sinks):
    """Weights renormalised over the keys and one sink logit per head: out · sigmoid(lse - s)."""
    s = sinks.to(lse.dtype).reshape(1, -1, 1)
    return (out * torch.sigmoid(lse - s).transpose(1, 2).unsqueeze(-1)).to(out.dtype)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, softcap: float | None = None,
                      backend: str = "auto", **kwargs):
    """transformers' attention-interface function for "qkv".

    query (B, Hq, Lq, D), key (B, Hk, Lk, D), value (B, Hk, Lk, Dv) -> (out (B, Lq, Hq, Dv),
    weights (B, Hq, Lq, Lk) when `output_attentions`, else None).
    """
    _refuse(kwargs)
    key, value, keywords, cu = _visibility(module, query, key, value, attention_mask, kwargs)
    keywords.update(scale=scaling, softcap=softcap or None, dropout_p=float(dropout),
                    backend=backend)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        keywords["return_lse"] = True
    out, lse = _attend(query, key, value, cu, keywords)
    if sinks is not None:
        out = _with_sinks(out, lse, sinks)
    weights = None
    if kwargs.get("output_attentions"):
        if cu is not None or sinks is not None:
            raise NotImplementedError("the qkv attention backend returns attention weights "
                                      "only for unpacked calls without sinks")
        shape = {k: v for k, v in keywords.items() if k not in ("dropout_p", "backend")}
        weights = attention_weights(query, key, **shape).to(query.dtype)
    return out.contiguous(), weights


def register(name: str = NAME, backend: str = "auto") -> str:
    """Register qkv with transformers as `attn_implementation=name`; returns the name.

    `backend` is the `qkv.attention` backend used ("auto": the fastest that supports each call).
    Registering again replaces the earlier registration.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    if backend != "auto":
        _registry.get(backend)  # ValueError naming the backends

    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask_for)
    return name
