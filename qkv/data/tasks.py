"""Seeded synthetic tasks that probe memory and long-range use: copy memory, multi-query
associative recall, induction heads, and planted-keyword classification.

Every generator draws from its own `torch.Generator` seeded with `seed`, so the same arguments
give the same tensors. Sequence tasks return `TaskData`, whose targets are ALIGNED with the
inputs: `targets[:, t]` is what the model's output at position t must predict (no shift), and
IGNORE_INDEX marks positions that are not scored. That is the convention of `DecoderLM`'s loss,
so `model(inputs, targets)` trains on a task directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qkv.nn.config import check_choice, check_int
from qkv.nn.models import IGNORE_INDEX

COPY_LAYOUTS = ("tcn", "arjovsky")
MQAR_POWER_A = 0.01  # Zoology's default power law of the key-to-query gap
PLANTED_SET_SIZE = 4  # tokens in each of the positive and the negative keyword sets


@dataclass(frozen=True)
class TaskData:
    """A sequence task: inputs (N, L) int64, targets (N, L) int64 aligned with the inputs
    (IGNORE_INDEX where unscored), and the vocabulary size the inputs and targets lie in."""

    inputs: torch.Tensor
    targets: torch.Tensor
    vocab_size: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs[index], targets[index]) for any tensor index (an int, slice or index tensor)."""
        return self.inputs[index], self.targets[index]


@dataclass(frozen=True)
class PlantedData:
    """A classification task: inputs (N, L) int64, labels (N,) int64, planted (N, L) bool (True
    where a planted token decides the label), the vocabulary size and the number of classes."""

    inputs: torch.Tensor
    labels: torch.Tensor
    planted: torch.Tensor
    vocab_size: int
    n_classes: int

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _check_at_least(name: str, value, minimum: int, why: str) -> None:
    """ValueError naming `name` unless `value` is an int >= minimum; `why` explains the bound."""
    check_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} ({why}), got {value}")


def _generator(seed) -> torch.Generator:
    check_int("seed", seed, minimum=0)
    return torch.Generator().manual_seed(seed)


def _draw_distinct(n: int, low: int, high: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) int64: in each row, k distinct integers drawn uniformly from [low, high)."""
    return torch.rand(n, high - low, generator=g).argsort(dim=1)[:, :k] + low


def copy_memory(n: int, T: int, *, seed: int, n_symbols: int = 8, length: int = 10,
                layout: str = "tcn") -> TaskData:
    """The copy-memory task of Bai, Kolter & Koltun (2018), "An Empirical Evaluation of Generic
    Convolutional and Recurrent Networks for Sequence Modeling", section 5.

    Tokens: 0 is the blank, 1..n_symbols the symbols, n_symbols + 1 the delimiter (vocab_size =
    n_symbols + 2; with the defaults the paper's digits 0-9). Each row has L = T + 2*length
    tokens: `length` symbols drawn uniformly from 1..n_symbols, then T - 1 blanks, then
      layout="tcn": the delimiter repeated length + 1 times (the paper: "the last 11 entries are
                    filled with the digit 9", as in its code);
      layout="arjovsky": one delimiter and `length` blanks (Arjovsky, Shah & Bengio 2016).
    Targets: T + length blanks, then the `length` symbols. Every position is scored, so a model
    that predicts the blanks perfectly and guesses the symbols has the loss no_memory_loss(T).

    Raises ValueError naming n, T, seed, n_symbols, length or layout when one is invalid.
    """
    check_int("n", n)
    check_int("T", T)
    check_int("n_symbols", n_symbols)
    check_int("length", length)
    check_choice("layout", layout, COPY_LAYOUTS)
    g = _generator(seed)
    delimiter = n_symbols + 1
    symbols = torch.randint(1, n_symbols + 1, (n, length), generator=g)  # (N, length)
    inputs = torch.zeros(n, T + 2 * length, dtype=torch.long)
    inputs[:, :length] = symbols
    if layout == "tcn":
        inputs[:, T + length - 1:] = delimiter
    else:
        inputs[:, T + length - 1] = delimiter
    targets = torch.zeros_like(inputs)
    targets[:, T + length:] = symbols
    return TaskData(inputs, targets, n_symbols + 2)


def no_memory_loss(T: int, *, n_symbols: int = 8, length: int = 10) -> float:
    """length * ln(n_symbols) / (T + 2*length): the mean cross-entropy per position on
    copy_memory(T) of a model that predicts every blank perfectly and, having no memory,
    spreads the last `length` outputs uniformly over the n_symbols symbols (Bai et al. 2018)."""
    check_int("T", T)
    check_int("n_symbols", n_symbols)
    check_int("length", length)
    return length * math.log(n_symbols) / (T + 2 * length)


def mqar(n: int, seq_len: int, n_pairs: int, *, seed: int, vocab_size: int = 256) -> TaskData:
    """Multi-query associative recall, as in Arora, Eyuboglu et al. (2023), "Zoology: Measuring
    and Improving Recall in Efficient Language Models" (their `multiquery_ar`).

    Keys come from [1, vocab_size // 2) and values from [vocab_size // 2, vocab_size), so the two
    never overlap; each row has n_pairs distinct keys, each with its own distinct value. The row
    opens with the pairs, key then value (positions 0 .. 2*n_pairs - 1). Every key is then
    queried exactly once, in random order, at even offsets of the rest of the row: the offset
    of a query is 2*gap with gap drawn without replacement from [0, (seq_len - 2*n_pairs) // 2)
    with weights gap ** (MQAR_POWER_A - 1) (Zoology's power law: short gaps are likelier). All
    other positions hold uniformly random tokens from the whole vocabulary, which are not scored.
    The target at a query position is the value paired with the key there; every other target
    is IGNORE_INDEX.

    Raises ValueError naming n, seq_len (it must be >= 4 * n_pairs), n_pairs, vocab_size (it
    must leave n_pairs distinct keys, vocab_size // 2 - 1 >= n_pairs) or seed.
    """
    check_int("n", n)
    check_int("n_pairs", n_pairs)
    _check_at_least("seq_len", seq_len, 4 * n_pairs,
                    f"{n_pairs} pairs take {2 * n_pairs} tokens and their queries need "
                    f"{n_pairs} even slots after them")
    _check_at_least("vocab_size", vocab_size, 2 * n_pairs + 2,
                    f"the keys [1, vocab_size // 2) must hold {n_pairs} distinct keys")
    g = _generator(seed)
    half, context = vocab_size // 2, 2 * n_pairs
    keys = _draw_distinct(n, 1, half, n_pairs, g)  # (N, P)
    values = _draw_distinct(n, half, vocab_size, n_pairs, g)  # (N, P)
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)  # (N, L) filler
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    space = (seq_len - context) // 2
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (MQAR_POWER_A - 1)
    gaps = torch.multinomial(weights.expand(n, space), n_pairs, replacement=False, generator=g)
    where = context + 2 * gaps  # (N, P) query positions
    inputs.scatter_(1, where, keys)
    targets = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, where, values)
    return TaskData(inputs, targets, vocab_size)


def induction(n: int, seq_len: int, *, seed: int, vocab_size: int = 16) -> TaskData:
    """The induction-heads task of the H3 and Mamba papers (Fu, Dao et al. 2023, "Hungry Hungry
    Hippos"; Gu & Dao 2023, "Mamba", section 4.1.2), as generated by HazyResearch's `safari`.

    Token vocab_size - 1 is the trigger; the rest of each row is uniform over [0, vocab_size -
    1), so the trigger occurs exactly twice: at a position p drawn uniformly from [0, seq_len -
    3], followed by the token X at p + 1, and again at the last position. The only scored target
    is at the last position, and it is X (the token that followed the trigger's earlier
    occurrence); every other target is IGNORE_INDEX.

    Raises ValueError naming n, seq_len (>= 3), vocab_size (>= 3) or seed.
    """
    check_int("n", n)
    check_int("seq_len", seq_len, minimum=3)
    check_int("vocab_size", vocab_size, minimum=3)
    g = _generator(seed)
    trigger = vocab_size - 1
    inputs = torch.randint(0, trigger, (n, seq_len), generator=g)  # (N, L), no trigger
    where = torch.randint(0, seq_len - 2, (n, 1), generator=g)  # (N, 1) the earlier trigger
    inputs.scatter_(1, where, trigger)
    inputs[:, -1] = trigger
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, -1] = inputs.gather(1, where + 1)[:, 0]
    return TaskData(inputs, targets, vocab_size)


def planted_keyword(n: int, seq_len: int, *, seed: int, vocab_size: int = 64,
                    n_planted: int = 2) -> PlantedData:
    """Binary classification whose evidence sits at known positions, so the true importance of
    every token is known (the setting in which Jain & Wallace 2019, "Attention is not
    Explanation", compare importance measures).

    Tokens [0, PLANTED_SET_SIZE) form the positive keyword set, [PLANTED_SET_SIZE,
    2*PLANTED_SET_SIZE) the negative set, and the rest is filler. Each row's label is a fair coin;
    n_planted distinct positions, uniform over the row, hold tokens drawn uniformly from the
    label's set (1: positive, 0: negative), and every other position holds filler drawn
    uniformly from [2*PLANTED_SET_SIZE, vocab_size), so filler never contains a keyword.
    `planted` is True exactly at the planted positions: any one of them decides the label.

    Raises ValueError naming n, seq_len (>= n_planted), vocab_size (>= 2*PLANTED_SET_SIZE + 2),
    n_planted or seed.
    """
    check_int("n", n)
    check_int("n_planted", n_planted)
    _check_at_least("seq_len", seq_len, n_planted, f"it holds n_planted={n_planted} keywords")
    _check_at_least("vocab_size", vocab_size, 2 * PLANTED_SET_SIZE + 2,
                    f"two keyword sets of {PLANTED_SET_SIZE} and at least two filler tokens")
    g = _generator(seed)
    k = PLANTED_SET_SIZE
    labels = torch.randint(0, 2, (n,), generator=g)  # (N,)
    inputs = torch.randint(2 * k, vocab_size, (n, seq_len), generator=g)  # (N, L) filler
    where = _draw_distinct(n, 0, seq_len, n_planted, g)  # (N, P)
    keywords = torch.randint(0, k, (n, n_planted), generator=g) + k * (1 - labels[:, None])
    inputs.scatter_(1, where, keywords)
    planted = torch.zeros(n, seq_len, dtype=torch.bool).scatter_(1, where, True)
    return PlantedData(inputs, labels, planted, vocab_size, 2)


__all__ = ["COPY_LAYOUTS", "MQAR_POWER_A", "PLANTED_SET_SIZE", "PlantedData", "TaskData",
           "copy_memory", "induction", "mqar", "no_memory_loss", "planted_keyword"]
