"""Decoding with caches: greedy, sampling (temperature, top-k, top-p) and beam search, and
`complete`, which continues a text prompt through a tokenizer.

Works for `DecoderLM` (the prompt is `input_ids`, left-padded, with `attention_mask`) and for
`EncoderDecoder` (`input_ids` is the source; the decoder starts from `bos_token_id`). Generation
stops when every row has produced `eos_token_id` or after `max_new_tokens`; finished rows are
filled with `pad_token_id` (default: eos). Call `model.eval()` first if it has dropout.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qkv.nn.cache import CACHE_KINDS, CrossAttentionCache, make_cache
from qkv.nn.config import check_choice, check_float, check_int, from_dict
from qkv.nn.models import DecoderLM, EncoderDecoder

if TYPE_CHECKING:
    from qkv.data import Tokenizer

_ABSOLUTE_POSITIONS = ("learned", "sinusoidal")


def _tokens(n: int) -> str:
    """ "1 token", "2 tokens": a count of tokens for a message."""
    return f"{n} token" if n == 1 else f"{n} tokens"


@dataclass
class GenerationConfig:
    """Settings of one generation call."""

    max_new_tokens: int = 20
    do_sample: bool = False  # False: greedy (or beam search when num_beams > 1)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / (new tokens) ** length_penalty
    eos_token_id: int | None = None
    pad_token_id: int | None = None  # None: eos_token_id (or 0 without eos)
    bos_token_id: int | None = None  # EncoderDecoder: the decoder's first token
    cache: str | None = "dynamic"  # dynamic | static | sliding | None (recompute every step)
    backend: str | None = None  # qkv.attention backend; None: each model's config

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens)
        check_choice("do_sample", self.do_sample, (True, False))
        check_float("temperature", self.temperature, low=0.0, low_open=True)
        check_int("top_k", self.top_k, optional=True)
        check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True, high_open=False,
                    optional=True)
        check_int("num_beams", self.num_beams)
        check_float("length_penalty", self.length_penalty, low=-1e9)
        check_int("eos_token_id", self.eos_token_id, minimum=0, optional=True)
        check_int("pad_token_id", self.pad_token_id, minimum=0, optional=True)
        check_int("bos_token_id", self.bos_token_id, minimum=0, optional=True)
        check_choice("cache", self.cache, (*CACHE_KINDS, None))
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search; it cannot be combined with do_sample")

    @property
    def pad(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id if self.eos_token_id is not None else 0


def _config(config: GenerationConfig | None, settings: dict) -> GenerationConfig:
    base = dataclasses.asdict(config) if config is not None else {}
    return from_dict(GenerationConfig, {**base, **settings})


class _Session:
    """One model's next-token logits over a growing batch of sequences, with or without a cache."""

    def __init__(self, model, input_ids, attention_mask, cfg: GenerationConfig, repeat: int = 1):
        if not isinstance(model, (DecoderLM, EncoderDecoder)):
            raise ValueError(f"model must be a DecoderLM or EncoderDecoder, got "
                             f"{type(model).__name__}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.dtype.is_floating_point or input_ids.shape[1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids must be a non-empty integer tensor (B, L), got {got}")
        mask = _check_mask(attention_mask, input_ids, left=isinstance(model, DecoderLM))
        if repeat > 1:
            input_ids = input_ids.repeat_interleave(repeat, dim=0)
            mask = mask.repeat_interleave(repeat, dim=0) if mask is not None else None
        self.model, self.cfg = model, cfg
        B, device = input_ids.shape[0], input_ids.device
        self.encdec = isinstance(model, EncoderDecoder)
        if self.encdec:
            if cfg.bos_token_id is None:
                raise ValueError("bos_token_id is required to generate with an EncoderDecoder")
            self.memory = model.encode(input_ids, src_mask=mask, backend=cfg.backend)
            self.memory_mask = mask
            self.tokens = torch.full((B, 1), cfg.bos_token_id, dtype=torch.long, device=device)
            self.mask = None
            config = model.config.decoder
        else:
            self.tokens, self.mask = input_ids, mask
            config = model.config
        if config.positions in _ABSOLUTE_POSITIONS:
            # Fail before any work is done, not at the step that runs off the position table.
            # The first real token of a left-padded row is position 0, so the longest row counts.
            longest = self.tokens.shape[1] if self.mask is None else int(self.mask.sum(1).max())
            if longest + cfg.max_new_tokens > config.max_len:
                raise ValueError(
                    f"prompt of {_tokens(longest)} plus max_new_tokens={cfg.max_new_tokens} "
                    f"exceeds the model's max_len={config.max_len} ({config.positions} positions)"
                )
        self.prefix = self.tokens
        self.cache = None
        self.cross = None
        if cfg.cache is not None:
            max_len = self.tokens.shape[1] + cfg.max_new_tokens
            self.cache = make_cache(cfg.cache, max_len=max_len, window=config.window)
            self.cross = CrossAttentionCache() if self.encdec else None

    def _logits(self, tokens, mask) -> torch.Tensor:
        if self.encdec:
            logits = self.model.decode(
                tokens, self.memory, tgt_mask=mask, memory_mask=self.memory_mask,
                cache=self.cache, cross_cache=self.cross, last_only=True,
                backend=self.cfg.backend,
            )
        else:
            logits, _ = self.model(tokens, attention_mask=mask, cache=self.cache, last_only=True,
                                   backend=self.cfg.backend)
        return logits[:, -1]  # (B, V)

    def first(self) -> torch.Tensor:
        """Logits (B, V) after the prompt."""
        return self._logits(self.tokens, self.mask)

    def next(self, tok: torch.Tensor) -> torch.Tensor:
        """Append tok (B,) and return the logits (B, V) after it."""
        self.tokens = torch.cat((self.tokens, tok[:, None]), dim=1)
        if self.mask is not None:
            self.mask = torch.cat((self.mask, self.mask.new_ones(tok.shape[0], 1)), dim=1)
        if self.cache is None:
            return self._logits(self.tokens, self.mask)
        return self._logits(tok[:, None], None)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index`: beam search's reshuffle (beams never leave their batch item)."""
        self.tokens = self.tokens.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def _check_mask(mask, input_ids, left: bool):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {got}")
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row of attention_mask needs at least one real token")
    if left and bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError("a DecoderLM prompt must be left-padded: attention_mask must be "
                         "0...0 1...1 in every row")
    return None if bool(mask.all()) else mask


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator) -> torch.Tensor:
    """The next token (B,) from logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    # float64 keeps tiny temperatures finite; a row that still overflows (+inf or NaN after
    # scaling) is as sharp as a distribution gets, so it takes its argmax
    scaled = logits.double() / cfg.temperature
    overflow = (scaled == float("inf")).any(dim=-1) | scaled.isnan().any(dim=-1)
    if bool(overflow.any()):
        sampled = _sample(scaled.masked_fill(overflow[:, None], 0.0), cfg, generator)
        return torch.where(overflow, logits.argmax(dim=-1), sampled)
    return _sample(scaled, cfg, generator)


def _sample(logits: torch.Tensor, cfg: GenerationConfig, generator) -> torch.Tensor:
    """A token (B,) drawn from temperature-scaled logits (B, V) after top-k/top-p."""
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model, input_ids, *, attention_mask=None, generator: torch.Generator | None = None,
           config: GenerationConfig | None = None, **settings) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding as an iterator: yields each step's tokens (B,).

    Rows that have finished (produced eos) yield pad_token_id. Settings are GenerationConfig's
    fields; unknown or invalid ones raise ValueError.
    """
    cfg = _config(config, settings)
    if cfg.num_beams > 1:
        raise ValueError("stream and callback work with greedy or sampling; use beam_search")
    session = _Session(model, input_ids, attention_mask, cfg)
    logits = session.first()
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(cfg.max_new_tokens):
        tok = _pick(logits, cfg, generator)
        if cfg.eos_token_id is not None:
            tok = tok.masked_fill(finished, cfg.pad)
            finished |= tok == cfg.eos_token_id
        yield tok
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            return
        logits = session.next(tok)


@torch.no_grad()
def generate(model, input_ids, *, attention_mask=None,
             callback: Callable[[torch.Tensor], None] | None = None,
             generator: torch.Generator | None = None,
             config: GenerationConfig | None = None, **settings) -> torch.Tensor:
    """Generate up to max_new_tokens; return (B, prefix + new) token ids.

    The prefix is the left-padded prompt for a DecoderLM, [bos] for an EncoderDecoder.
    `callback(tokens (B,))` is called after every step (greedy and sampling). num_beams > 1 runs
    `beam_search` and returns its best sequences. Settings are GenerationConfig's fields.
    """
    cfg = _config(config, settings)
    if cfg.num_beams > 1:
        if callback is not None:
            raise ValueError("callback streams greedy or sampled tokens; beam search has none")
        return beam_search(model, input_ids, attention_mask=attention_mask, config=cfg)[0]
    steps = []
    for tok in stream(model, input_ids, attention_mask=attention_mask, generator=generator,
                      config=cfg):
        steps.append(tok)
        if callback is not None:
            callback(tok)
    prefix = input_ids if isinstance(model, DecoderLM) else torch.full(
        (input_ids.shape[0], 1), cfg.bos_token_id, dtype=torch.long, device=input_ids.device)
    return torch.cat([prefix, torch.stack(steps, dim=1)], dim=1)


@torch.no_grad()
def beam_search(model, input_ids, *, attention_mask=None, config: GenerationConfig | None = None,
                **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search with num_beams beams per row; returns (sequences (B, T), scores (B,)).

    A hypothesis's score is its summed log-probability over the new tokens (eos included),
    divided by (number of new tokens) ** length_penalty. A row stops when it holds num_beams
    finished hypotheses and its best live beam scores no better than the worst of them, or after
    max_new_tokens; then its best hypothesis wins. Sequences are the prefix, the new tokens, and
    pad_token_id after shorter ones.
    """
    cfg = _config(config, settings)
    K = cfg.num_beams
    session = _Session(model, input_ids, attention_mask, cfg, repeat=K)
    B = input_ids.shape[0]
    device = input_ids.device
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # the K copies start identical: keep one
    scores = scores.flatten()  # (B*K,)
    new = torch.empty(B * K, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    norm = lambda s, n: s / n ** cfg.length_penalty
    logits = session.first()
    for step in range(cfg.max_new_tokens):
        n = step + 1
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, None] + logp).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        rows, toks, kept = [], [], []
        for b in range(B):
            chosen = []
            if not done[b]:
                for r, (s, i) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist(),
                                               strict=True)):
                    row, t = b * K + i // V, i % V
                    if t == cfg.eos_token_id:
                        if r < K and s > float("-inf"):
                            seq = torch.cat((new[row], new.new_tensor([t])))
                            finished[b].append((norm(s, n), seq))
                        continue
                    chosen.append((row, t, s))
                    if len(chosen) == K:
                        break
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_live = norm(chosen[0][2], n) if chosen else float("-inf")
                if len(finished[b]) == K and finished[b][-1][0] >= best_live:
                    done[b] = True
            while len(chosen) < K:  # finished rows, or too small a vocabulary: idle beams
                j = len(chosen)
                chosen.append((b * K + j, cfg.pad, float("-inf")))
            for row, t, s in chosen:
                rows.append(row)
                toks.append(t)
                kept.append(s)
        index = torch.tensor(rows, device=device)
        tok = torch.tensor(toks, device=device)
        scores = torch.tensor(kept, device=device)
        new = torch.cat((new.index_select(0, index), tok[:, None]), dim=1)
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        session.reorder(index)
        logits = session.next(tok)
    best = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            for j in range(K):
                s = float(scores[b * K + j])
                if s > float("-inf"):
                    hyps.append((norm(s, new.shape[1]), new[b * K + j]))
        best.append(max(hyps, key=lambda h: h[0]))
    width = max(len(seq) for _, seq in best)
    out = torch.full((B, width), cfg.pad, dtype=torch.long, device=device)
    for b, (_, seq) in enumerate(best):
        out[b, : len(seq)] = seq
    prefix = session.prefix[::K]
    sequences = torch.cat((prefix, out), dim=1)
    return sequences, torch.tensor([s for s, _ in best], device=device)


def complete(model: DecoderLM, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, cache: str | None = "dynamic", stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None) -> str:
    """The completion of `prompt` (without the prompt), decoded with `stream` and its KV cache.
    temperature 0 is greedy decoding; otherwise sampling (top-k / top-p).

    `on_text(piece)` receives the new text after every token, except that a piece ending in an
    incomplete UTF-8 character waits for the token that completes it. A model with learned or
    sinusoidal positions can see at most max_len tokens: a prompt that long keeps its last
    max_len // 2 tokens, and a max_new_tokens that would run past max_len is capped, with a
    UserWarning. Raises ValueError for an empty prompt.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 1:
        raise ValueError(f"seed must be an int in [0, 2**63-1], got {seed!r}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    limit = model.config.max_len if model.config.positions in _ABSOLUTE_POSITIONS else None
    if limit is not None:
        ids = ids[-max(1, limit // 2):] if len(ids) >= limit else ids
        fits = max(1, limit - len(ids))
        if max_new_tokens > fits:
            warnings.warn(f"max_new_tokens={max_new_tokens} is capped at {fits}: a prompt of "
                          f"{_tokens(len(ids))} leaves only {fits} of the model's max_len={limit} "
                          f"positions", UserWarning, stacklevel=2)
            max_new_tokens = fits
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    settings = {"max_new_tokens": max_new_tokens, "cache": cache,
                "eos_token_id": tokenizer.eos_id if stop_at_eos else None}
    if temperature > 0:
        settings.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    new: list[int] = []
    shown = ""
    for tok in stream(model, input_ids, generator=generator, **settings):
        token = int(tok[0])
        if stop_at_eos and token == tokenizer.eos_id:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # wait for the rest of the character
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
