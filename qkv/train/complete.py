"""Completing a text prompt with a trained model, streaming the text as it is decoded."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qkv.data import Tokenizer
from qkv.generate import stream
from qkv.nn import DecoderLM

_ABSOLUTE_POSITIONS = ("learned", "sinusoidal")


def complete(model: DecoderLM, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, cache: str | None = "dynamic", stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None) -> str:
    """The completion of `prompt` (without the prompt), decoded with `qkv.generate.stream` and
    its KV cache. temperature 0 is greedy decoding; otherwise sampling (top-k / top-p).

    `on_text(piece)` receives the new text after every token, except that a piece ending in an
    incomplete UTF-8 character waits for the token that completes it. A model with learned or
    sinusoidal positions can see at most max_len tokens: a longer prompt keeps its end, and
    max_new_tokens shrinks to fit. Raises ValueError for an empty prompt.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    limit = model.config.max_len if model.config.positions in _ABSOLUTE_POSITIONS else None
    if limit is not None:
        ids = ids[-max(1, limit // 2):] if len(ids) >= limit else ids
        max_new_tokens = max(1, min(max_new_tokens, limit - len(ids)))
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
