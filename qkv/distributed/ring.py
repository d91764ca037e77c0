"""A ring of the ranks of one process group: each rank sends to the next and receives from the
previous, point to point, so that a block travels once around the ring in N - 1 steps while each
rank holds at most two blocks at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# Two shifts may be in flight at once between the same two ranks (K/V blocks and their
# gradients); each tensor of a shift travels under its own tag, tag + its index.
KV_TAG, GRAD_TAG = 0, 2


class Ring:
    """This process's place in a ring over `group` (None: the default group)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: context-parallel attention needs torch.distributed "
                             "initialised (dist.init_process_group, or run under torchrun)")
        self.group = dist.group.WORLD if group is None else group
        if self.group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("group: this process is not a member of the group it was given")
        self.size = dist.get_world_size(self.group)
        if self.size < 2:
            raise ValueError(f"group must hold at least 2 processes, got a group of "
                             f"{self.size}; for one process call qkv.attention")
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The group rank whose block this rank holds at `step` (0: its own)."""
        return (self.rank - step) % self.size

    def shift(self, tensors: Sequence[torch.Tensor], tag: int) -> _Transfer:
        """Start sending `tensors` to the next rank and receiving the previous rank's tensors
        of the same shapes and dtypes; `.wait()` returns those."""
        sent = [t.contiguous() for t in tensors]  # received blocks already are: no copy
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i)
               for i, t in enumerate(sent)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i)
                for i, t in enumerate(received)]
        return _Transfer(dist.batch_isend_irecv(ops), sent, received)

    def all_gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `values` (same shape on all), in group rank order."""
        out = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(out, values, group=self.group)
        return out


class _Transfer:
    """One shift in flight; it keeps the tensors it sends alive until they are sent."""

    def __init__(self, requests, sent, received):
        self.requests, self.sent, self.received = requests, sent, received

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        self.sent = None
        return self.received
