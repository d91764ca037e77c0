"""Fixtures shared by the interop tests: the shipped MiniLM, and sentences to embed.

transformers and sentence-transformers are the oracles; the hub is never reached.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

LONG = (
    "Attention compares a query with the key of every token, turns the scores into weights "
    "with a softmax, and blends the values with those weights. "
)


def sentences() -> list[str]:
    """A few dozen texts: empty, one word, unicode, medium, ~200 tokens, and over 256 tokens."""
    texts = [
        "", "a", "Hi!", "ok", "The cat sat on the mat.",
        "café naïve résumé — déjà vu", "Привет, мир! Как дела?", "日本語のテキストも扱えます。",
        "🙂 emoji and ✓ symbols ∑∫ in a sentence", "Ελληνικά και العربية and עברית",
        "Exact attention in linear memory, on CPU and GPU.",
        "A query row with no visible key outputs zeros, never NaN.",
        "GPT-2 is pre-LN; BERT is post-LN with exact GELU.",
        "   leading and trailing spaces   ", "UPPER CASE words Are Lower-Cased By The Tokenizer",
        "numbers 3.14159 2718 and dates 2024-01-31", "tab\tseparated\tvalues",
        "Short.", "Two sentences here. And another one!",
        "The quick brown fox jumps over the lazy dog " * 3,
        LONG * 2, LONG * 4,
        LONG * 7,  # about 200 tokens
        LONG * 12,  # over 256 tokens: truncated
        "What is the capital of France?", "Paris is the capital and largest city of France.",
        "Sentence embeddings map text to vectors.", "Vectors of similar texts lie close.",
        "x" * 300, "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "mixed 中文 English 한국어 text", "question? exclamation! semicolon; colon: dash -",
    ]
    return texts


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return sentences()


@pytest.fixture(scope="session")
def minilm():
    from qkv.interop.minilm import load_minilm

    return load_minilm(device="cpu")


@pytest.fixture(scope="session")
def st_embeddings(texts):
    """sentence-transformers' embeddings of `texts`, from the shipped folder."""
    import torch
    from sentence_transformers import SentenceTransformer

    from qkv.interop.minilm import model_dir

    model = SentenceTransformer(str(model_dir()), device="cpu")
    with torch.inference_mode():
        out = model.encode(texts, batch_size=8, convert_to_tensor=True,
                           normalize_embeddings=True)
    return out.float().cpu()
