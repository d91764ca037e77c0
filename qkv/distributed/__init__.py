"""`qkv.distributed`: attention across processes (context parallelism) on torch.distributed.

`context_parallel_attention` computes exact attention over a sequence sharded across a process
group; `shard_sequence`, `unshard_sequence` and `sequence_positions` cut a sequence into the
shards it takes (zigzag or contiguous) and put it back; `ContextParallelLM` trains a DecoderLM
that way.
"""

from qkv.distributed.attention import context_parallel_attention, merge_partials
from qkv.distributed.lm import ContextParallelLM
from qkv.distributed.sharding import (
    LAYOUTS,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "LAYOUTS",
    "ContextParallelLM",
    "context_parallel_attention",
    "merge_partials",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]
