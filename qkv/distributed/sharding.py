"""How a sequence is cut among the ranks of a context-parallel group, and put back together.

Two layouts, for a group of N ranks and a sequence of length L:

- "contiguous": rank r holds positions [r·L/N, (r+1)·L/N). Under causal attention the last rank
  sees every key and the first rank almost none, so the work is unbalanced.
- "zigzag" (head-tail): the sequence is cut into 2N equal chunks and rank r holds chunk r
  followed by chunk 2N-1-r. Under causal attention every rank then has the same number of
  visible query-key pairs, because each holds one early and one late chunk.

`shard_sequence` and `unshard_sequence` are plain tensor functions (no process group);
`sequence_positions` gives the global positions a rank's shard holds, which position
embeddings and RoPE need.
"""

from __future__ import annotations

import torch

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def _check_rank(rank, world_size) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")


def chunks_per_rank(layout: str) -> int:
    """How many equal chunks of the sequence each rank holds: 2 for zigzag, 1 for contiguous."""
    return 2 if check_layout(layout) == "zigzag" else 1


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The global chunk numbers rank `rank` holds, in the order of its shard. The sequence is
    cut into world_size * chunks_per_rank(layout) equal chunks."""
    _check_rank(rank, world_size)
    if check_layout(layout) == "zigzag":
        return rank, 2 * world_size - 1 - rank
    return (rank,)


def _chunks(length: int, world_size: int, layout: str, what: str) -> int:
    """The number of chunks the sequence is cut into; ValueError if length does not divide."""
    n = world_size * chunks_per_rank(layout)
    if length % n:
        why = f"2 × world_size = {n}" if layout == "zigzag" else f"world_size = {n}"
        raise ValueError(f"{what} has length {length}, which the {layout} layout cannot split "
                         f"among {world_size} ranks: it must be divisible by {why}")
    return n


def _seq_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for x of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, *,
                   layout: str = "zigzag") -> torch.Tensor:
    """Rank `rank`'s shard of `x` along `dim` (the sequence dimension: 2 for (B, H, L, D), 1 for
    token ids (B, L)). The result is a new contiguous tensor of length L / world_size there.

    Raises ValueError if L is not divisible by world_size (contiguous) or 2 × world_size
    (zigzag).
    """
    dim = _seq_dim(x, dim)
    _check_rank(rank, world_size)
    n = _chunks(x.shape[dim], world_size, layout, f"x of shape {tuple(x.shape)} (dim {dim})")
    pieces = x.chunk(n, dim)
    return torch.cat([pieces[i] for i in chunk_ids(rank, world_size, layout)], dim)


def unshard_sequence(shards, dim: int, *, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's shard (a list in rank order): the inverse of
    `shard_sequence`."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError("shards must be a non-empty list of tensors, one per rank")
    world_size, per = len(shards), chunks_per_rank(layout)
    dim = _seq_dim(shards[0], dim)
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"shards must all have one shape, got {sorted(shapes)}")
    _chunks(shards[0].shape[dim] * world_size, world_size, layout,
            f"the sequence of {world_size} shards of shape {tuple(shards[0].shape)}")
    pieces: list[torch.Tensor | None] = [None] * (world_size * per)
    for rank, shard in enumerate(shards):
        for chunk, piece in zip(chunk_ids(rank, world_size, layout), shard.chunk(per, dim),
                                strict=True):
            pieces[chunk] = piece
    return torch.cat(pieces, dim)


def sequence_positions(length: int, rank: int, world_size: int, *, layout: str = "zigzag",
                       device=None) -> torch.Tensor:
    """(length / world_size,) int64: the global positions of rank `rank`'s shard of a sequence
    of `length` tokens."""
    positions = torch.arange(length, device=device)
    return shard_sequence(positions, 0, rank, world_size, layout=layout)
