"""KV caches for incremental decoding.

A self-attention cache is one object for the whole model. Each forward pass first calls
`step(mask, B, L, device)` once, which records the new tokens' padding and returns their absolute
positions (left padding does not count toward them) and the padding mask of every key the layers
will see. Then each layer calls `update(layer_idx, k, v) -> (k_all, v_all, kv_lengths or None)`.
Keys are returned in order, oldest first, so qkv.attention's bottom-right alignment puts the newest
query on the newest key; causal masks, windows and ALiBi distances all stay right.

The caches here return kv_lengths None: every row advances together, and per-row padding is the
mask returned by `step`.

`DynamicCache` and `StaticCache` keep each layer's keys in a buffer with room at the end
(`k[layer]`, of which the first `lengths[layer]` are filled) and return views of its filled
part. An append writes past what any earlier view covers, so tensors returned by earlier steps
keep their values; `DynamicCache` moves to a larger buffer when one is full (the old buffer
stays as it is for whoever still holds a view of it), and its reorder (beam search) builds new
buffers. `StaticCache` reorders in place: the buffers keep their storage.

`CrossAttentionCache` holds the encoder's projected K/V, computed once per generation.
"""

from __future__ import annotations

import torch

from qkv.nn.config import check_int
from qkv.nn.positions import positions_from_mask


def _reorder(*stores: dict[int, torch.Tensor], index: torch.Tensor, in_place: bool = False):
    """Keep rows `index` of every tensor in `stores` (dicts layer -> (B, ...)), in that order;
    `in_place` writes into the tensors (preallocated buffers) instead of replacing them."""
    for store in stores:
        for i, t in store.items():
            if in_place:
                t.copy_(t.index_select(0, index))
            else:
                store[i] = t.index_select(0, index)


class KVCache:
    """The shared bookkeeping: per-row position offsets and the key padding mask."""

    window: int | None = None

    _in_place = False  # reorder writes into the stored tensors instead of replacing them

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> (B, Hk, kept, D)
        self.v: dict[int, torch.Tensor] = {}
        self.seen = 0  # tokens (real or padding) stepped through so far
        self._offset: torch.Tensor | None = None  # (B,) real tokens so far, per row
        self._mask: torch.Tensor | None = None  # (B, kept) bool, None when every key is real
        self._batch: int | None = None

    def _kept(self, n: int) -> int:
        """How many of n keys the cache holds."""
        return n

    @property
    def offsets(self) -> torch.Tensor | None:
        """(B,) the absolute position the next real token of each row will get."""
        return self._offset

    def step(self, mask: torch.Tensor | None, B: int, L: int, device):
        """Record L new tokens; return (positions (B, L), key mask (B, Lk) bool or None)."""
        if self._batch is None:
            self._batch = B
            self._offset = torch.zeros(B, dtype=torch.long, device=device)
        elif self._batch != B:
            raise ValueError(f"this cache holds a batch of {self._batch} rows, got {B}")
        positions = positions_from_mask(mask, B, L, device, self._offset)
        self._offset = self._offset + (mask.long().sum(-1) if mask is not None else L)
        kept = self._kept(self.seen)
        key_mask = None
        if mask is not None or self._mask is not None:
            ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=device)
            old = self._mask if self._mask is not None else ones(kept)
            key_mask = torch.cat((old, mask if mask is not None else ones(L)), dim=1)
        self.seen += L
        if key_mask is not None:
            self._mask = key_mask[:, key_mask.shape[1] - self._kept(self.seen):]
            if not torch.compiler.is_compiling() and bool(self._mask.all()):
                self._mask = None  # traced, an all-True mask is kept: the same result, no break
        return positions, key_mask

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def _check(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._batch is None:
            raise ValueError("call cache.step(...) before update (models do this in forward)")
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != self._batch:
            raise ValueError(f"k and v must be (B={self._batch}, Hk, L, D), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        for name, new, held in (("k", k, self.k.get(layer_idx)), ("v", v, self.v.get(layer_idx))):
            if held is None:
                continue
            if (new.shape[1], new.shape[3]) != (held.shape[1], held.shape[3]) or (
                    new.dtype != held.dtype or new.device != held.device):
                raise ValueError(
                    f"{name} of layer {layer_idx} must match the cached keys: (B, "
                    f"{held.shape[1]}, L, {held.shape[3]}) {held.dtype} on {held.device}, got "
                    f"{tuple(new.shape)} {new.dtype} on {new.device}")

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B,) in that order: beam search's reshuffle."""
        _reorder(self.k, self.v, index=index, in_place=self._in_place)
        if self._offset is not None:
            self._offset = self._offset.index_select(0, index)
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index)


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an append of these: then no buffer may be written in place."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Buffered(KVCache):
    """Each layer's K/V in buffers (B, Hk, room, D), of which the first lengths[layer] keys are
    filled."""

    def __init__(self):
        super().__init__()
        self.lengths: dict[int, int] = {}

    def _written(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v after the filled part of the layer's buffers (which must have room);
        return views of the filled part, (B, Hk, Lk, D) each, and kv_lengths None."""
        n = self.lengths[layer_idx]
        end = n + k.shape[2]
        self.k[layer_idx][:, :, n:end] = k
        self.v[layer_idx][:, :, n:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end], None


class DynamicCache(_Buffered):
    """Grows with every step, into buffers with room to spare (views of the filled part).

    A full buffer is replaced by one with room for an eighth more (at least `MIN_SPARE` keys),
    so appending costs O(1) amortised per token instead of a copy of the whole cache, for at
    most an eighth more memory (on the CPU, pages never written are not even resident). The
    first update (the prompt) already gets room, so the first decoding step copies nothing,
    and the cache holds no view of the layer's projection output. While autograd records
    (grad enabled and a K/V that requires grad), every append concatenates instead, so no
    tensor saved for backward is written in place.
    """

    MIN_SPARE = 64  # keys

    def update(self, layer_idx, k, v):
        """Append k, v (B, Hk, L, D); return every key and value so far (B, Hk, Lk, D)."""
        self._check(layer_idx, k, v)
        n = self.lengths.setdefault(layer_idx, 0)
        need = n + k.shape[2]
        held_k = self.k.get(layer_idx, k[:, :, :0])  # no keys yet: an empty buffer
        held_v = self.v.get(layer_idx, v[:, :, :0])
        if _needs_graph(k, v, held_k, held_v):
            self.k[layer_idx] = torch.cat((held_k[:, :, :n], k), dim=2)
            self.v[layer_idx] = torch.cat((held_v[:, :, :n], v), dim=2)
            self.lengths[layer_idx] = need
            return self.k[layer_idx], self.v[layer_idx], None
        # an inference tensor (a prefill under torch.inference_mode) is written only inside it;
        # traced code (which cannot ask) runs under no_grad instead
        frozen = not torch.compiler.is_compiling() and held_k.is_inference() and (
            not torch.is_inference_mode_enabled())
        if need > held_k.shape[2] or frozen:
            room = need + max(need // 8, self.MIN_SPARE)
            self.k[layer_idx], self.v[layer_idx] = _moved(held_k, n, room), _moved(held_v, n, room)
        return self._written(layer_idx, k, v)


def _moved(held: torch.Tensor, n: int, room: int) -> torch.Tensor:
    """A buffer (B, H, room, D) holding the first n keys of `held`."""
    B, H, _, D = held.shape
    out = held.new_empty(B, H, room, D)
    out[:, :, :n] = held[:, :, :n]
    return out


class StaticCache(_Buffered):
    """Preallocates max_len keys per layer on first use; returns views of the filled part."""

    _in_place = True  # the preallocated buffers keep their storage

    def __init__(self, max_len: int):
        super().__init__()
        check_int("max_len", max_len)
        self.max_len = max_len

    def update(self, layer_idx, k, v):
        """Write k, v (B, Hk, L, D) after the filled part; return views (B, Hk, Lk, D)."""
        self._check(layer_idx, k, v)
        if layer_idx not in self.k:
            B, H, _, D = k.shape
            self.k[layer_idx] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer_idx] = v.new_zeros(B, v.shape[1], self.max_len, v.shape[3])
            self.lengths[layer_idx] = 0
        n, L = self.lengths[layer_idx], k.shape[2]
        if n + L > self.max_len:
            raise ValueError(f"StaticCache of max_len={self.max_len} cannot hold {n + L} keys")
        return self._written(layer_idx, k, v)


class SlidingWindowCache(KVCache):
    """Keeps only the last `window` keys, in order (rolled by slicing).

    A step returns the kept keys followed by the new ones, so a model whose attention window is
    at most `window` (each query sees at most `window` earlier keys) attends exactly as without a
    cache.
    """

    def __init__(self, window: int):
        super().__init__()
        check_int("window", window)
        self.window = window

    def _kept(self, n: int) -> int:
        return min(n, self.window)

    def update(self, layer_idx, k, v):
        """Return kept + new keys (B, Hk, <= window + L, D); keep the last `window` of them."""
        self._check(layer_idx, k, v)
        if layer_idx in self.k:
            k = torch.cat((self.k[layer_idx], k), dim=2)
            v = torch.cat((self.v[layer_idx], v), dim=2)
        keep = max(k.shape[2] - self.window, 0)
        self.k[layer_idx], self.v[layer_idx] = k[:, :, keep:], v[:, :, keep:]
        return k, v, None


class CrossAttentionCache:
    """Each layer's cross-attention K/V (B, Hk, Ls, D), projected from the memory once."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def has(self, layer_idx: int) -> bool:
        return layer_idx in self.k

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_idx], self.v[layer_idx]

    def set(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer_idx], self.v[layer_idx] = k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B,) in that order."""
        _reorder(self.k, self.v, index=index)


CACHE_KINDS = ("dynamic", "static", "sliding")


def make_cache(kind: str, *, max_len: int | None = None, window: int | None = None) -> KVCache:
    """A self-attention cache by name: "dynamic", "static" (needs max_len), "sliding" (window)."""
    if kind == "dynamic":
        return DynamicCache()
    if kind == "static":
        if max_len is None:
            raise ValueError("a static cache needs max_len")
        return StaticCache(max_len)
    if kind == "sliding":
        if window is None:
            raise ValueError("a sliding-window cache needs window (the model's config.window)")
        return SlidingWindowCache(window)
    raise ValueError(f"cache must be one of {list(CACHE_KINDS)} or None, got {kind!r}")
