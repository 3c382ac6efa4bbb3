"""Move only the chosen rows between ranks: the token exchange behind FGR's global hard negatives.

Each rank asks for a few rows of the global batch by GLOBAL index (rank-major order of the gathered batch,
the indices `sample_hard_negatives` returns). `fetch_rows` deduplicates the requests, serves the rows this rank
owns by local indexing, and gets the others with one variable-count all-to-all per tensor: every rank sends
exactly the rows other ranks asked it for. Nothing gathers whole token tensors, so a rank receives at most
its number of distinct remote requests instead of (W - 1) x B_local rows.

Planning (for one or several sets of requests together): one all-to-all of counts (W x K int64 per rank) and
one host sync on it (the split sizes are shapes; on GPU torch.unique's output size syncs too), one all-to-all
of the requested indices; then one all-to-all per feature tensor. The feature all-to-all is
autograd-aware: its backward is the reverse all-to-all, and the gathered gradient rows are summed into the
owner's rows (index_add via the indexing that built the send buffer), so gradients reach the owner's towers.

Collective: every rank of `group` must call it, in the same order, even with zero requests (ZeRO and data
parallelism keep ranks in lock-step anyway; an empty request list still takes part in every all-to-all).
Every collective runs on `comm_device(group)` (CUDA under NCCL, CPU under gloo); results come back on the
caller's device.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r2d2ds.distributed import get_rank, get_world_size, to_comm

__all__ = ["RowExchange", "fetch_rows", "plan_row_exchange", "plan_row_exchanges"]


@dataclass
class RowExchange:
    """Who sends what to whom for one set of requests (the plan is reused for several tensors).

    `inverse` (R,) maps each request to its row in `fetch`'s output; `local_rows` (U_local,) are local rows
    this rank serves itself; `send_rows` are local rows other ranks asked for, grouped by destination rank;
    counts are rows per rank (python ints: they are the all-to-all's split sizes)."""

    inverse: torch.Tensor  # (R,) int64 into cat([local rows, received rows])
    local_rows: torch.Tensor  # (U_local,) int64
    send_rows: torch.Tensor  # (S,) int64, grouped by destination
    send_counts: list[int]
    recv_counts: list[int]
    group: object = None

    @property
    def rows_received(self) -> int:
        return sum(self.recv_counts)

    @property
    def rows_sent(self) -> int:
        return sum(self.send_counts)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """(R, ...) the requested rows of the distributed tensor whose local part is `t` (B_local, ...).

        Differentiable: gradients of a remote row go back to its owner through the reverse all-to-all."""
        recv = _AllToAllRows.apply(t.index_select(0, self.send_rows), self.send_counts, self.recv_counts,
                                   self.group)
        rows = torch.cat([t.index_select(0, self.local_rows), recv])  # (U, ...)
        return rows.index_select(0, self.inverse)


def plan_row_exchange(global_idx: torch.Tensor, sizes: list[int], group=None) -> RowExchange:
    """Plan the exchange of the rows `global_idx` (int64 (R,), every entry in [0, sum(sizes))).

    `sizes`: rows held by each rank (rank order), e.g. from `collectives.gather_sizes`. Collective."""
    return plan_row_exchanges([global_idx], sizes, group)[0]


def plan_row_exchanges(index_sets: list[torch.Tensor], sizes: list[int], group=None) -> list[RowExchange]:
    """One plan per set of global row indices (e.g. FGR's negative texts and negative images), negotiated
    together: one all-to-all of counts (W x K int64) with one host sync, one all-to-all of the requested ids."""
    world, rank, total, k_sets = len(sizes), get_rank(group), sum(sizes), len(index_sets)
    device = index_sets[0].device
    starts = torch.tensor(list(itertools.accumulate(sizes, initial=0)), device=device, dtype=torch.long)
    local, remote, bad = [], [], []
    for idx in index_sets:
        # torch.unique sorts, so the remote rows come grouped by owner rank (and its output size syncs on GPU).
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        bad.append(((uniq < 0) | (uniq >= total)).any().reshape(1).long())
        owner = torch.bucketize(uniq, starts[1:], right=True)  # (U,) rank owning each unique row
        mine = owner == rank
        # `fetch`'s buffer: the local rows first, then the received ones in (sorted) global order.
        order = torch.cat([torch.nonzero(mine).flatten(), torch.nonzero(~mine).flatten()])
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=device)
        local.append((pos[inverse], uniq[mine] - starts[rank]))
        remote.append((uniq[~mine], owner[~mine].clamp(0, world - 1)))
    bad = torch.cat(bad).amax(0, keepdim=True)
    if world == 1:
        _check_range(bool(bad.item()), total)
        return [RowExchange(inv, rows, rows[:0], [0], [0], group) for inv, rows in local]

    want = torch.stack([torch.bincount(o, minlength=world) for _, o in remote], dim=1)  # (W, K) rows I ask r
    want = to_comm(want, group).contiguous()  # the backend's device (CUDA under NCCL), see comm_device
    asked = torch.empty_like(want)
    dist.all_to_all_single(asked, want, group=group)  # asked[r, k]: rows of set k that rank r asks of me
    counts = torch.cat([want.flatten(), asked.flatten(), bad]).tolist()  # host sync: split sizes are shapes
    _check_range(bool(counts[-1]), total)
    want_l = [counts[r * k_sets:(r + 1) * k_sets] for r in range(world)]
    asked_l = [counts[(world + r) * k_sets:(world + r + 1) * k_sets] for r in range(world)]
    # One id all-to-all for every set: to rank r go [set 0's ids owned by r, set 1's, ...].
    pieces = [torch.split(ids, [want_l[r][k] for r in range(world)]) for k, (ids, _) in enumerate(remote)]
    send_ids = torch.cat([pieces[k][r] for r in range(world) for k in range(k_sets)])
    send_ids = to_comm(send_ids, group).contiguous()
    recv_ids = send_ids.new_empty(sum(map(sum, asked_l)))
    dist.all_to_all_single(recv_ids, send_ids, output_split_sizes=[sum(a) for a in asked_l],
                           input_split_sizes=[sum(w) for w in want_l], group=group)
    got = torch.split(recv_ids.to(device) - starts[rank], [a for r in range(world) for a in asked_l[r]])
    plans = []
    for k, (inv, rows) in enumerate(local):
        send_rows = torch.cat([got[r * k_sets + k] for r in range(world)])
        plans.append(RowExchange(inv, rows, send_rows, [asked_l[r][k] for r in range(world)],
                                 [want_l[r][k] for r in range(world)], group))
    return plans


def _check_range(bad: bool, total: int) -> None:
    if bad:
        raise ValueError(f"global row indices must be in [0, {total}) (the rows of the global batch)")


def fetch_rows(global_idx: torch.Tensor, tensors: list[torch.Tensor], sizes: list[int],
               group=None) -> tuple[list[torch.Tensor], RowExchange]:
    """Rows `global_idx` of each distributed tensor (local parts `tensors`, all (B_local, ...)); collective."""
    plan = plan_row_exchange(global_idx, sizes, group)
    return [plan.fetch(t) for t in tensors], plan


class _AllToAllRows(torch.autograd.Function):
    """Variable-count all-to-all along dim 0; backward: the reverse all-to-all of the gradient rows."""

    @staticmethod
    def forward(ctx, send, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return _all_to_all(send, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return _all_to_all(grad, recv_counts, send_counts, ctx.group), None, None, None


def _all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = send.new_empty((sum(recv_counts), *send.shape[1:]))
    if get_world_size(group) == 1:
        return out.copy_(send)
    # Split sizes count rows: flatten each row so the collective sees (rows, row_elems) contiguous memory. The
    # rows travel on the backend's device (comm_device) and come back on the caller's: a no-op copy when the
    # compute already lives there (CUDA tensors under NCCL, CPU under gloo).
    row = math.prod(send.shape[1:])
    buf = to_comm(out, group)
    dist.all_to_all_single(buf.view(buf.shape[0], row), to_comm(send, group).contiguous().view(send.shape[0], row),
                           output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return buf.to(send.device)
