"""A seeded uniform row sample of a stream of tensors (bottom-k sampling), for the local step's errors."""
from __future__ import annotations

import math
from typing import Optional

import torch


class RowSample:
    """A seeded uniform sample, without replacement, of at most ``k`` rows of a stream of tensors.

    :meth:`add` offers the rows (dim 0) of tensors that share dim 0 and are kept or dropped together
    (the two operands of a matmul). Bottom-k sampling: every offered row gets an i.i.d. uniform
    float64 key from a CPU ``torch.Generator`` seeded with ``seed``, and the ``k`` rows with the
    smallest keys are kept (copies, in stream order), so the sample is deterministic for a seed and
    batch order and does not depend on the device. ``k`` is set by the first batch:
    ``max(1, samples // numel(one row of tensors[0]))``, i.e. at most ``samples`` elements of the
    first tensor, and at least one row.
    """

    def __init__(self, samples: int, seed: int) -> None:
        self.samples = samples
        self.gen = torch.Generator().manual_seed(seed)
        self.k: Optional[int] = None
        self.threshold = math.inf  # a row whose key is not below it cannot enter the sample
        self.keys: list[torch.Tensor] = []
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def add(self, *tensors: torch.Tensor) -> None:
        n = tensors[0].shape[0]
        if n == 0:
            return
        if self.k is None:
            self.k = max(1, self.samples // max(1, tensors[0][0].numel()))
        keys = torch.rand(n, generator=self.gen, dtype=torch.float64)
        idx = torch.nonzero(keys < self.threshold).squeeze(1)
        if len(idx) == 0:
            return
        self.keys.append(keys[idx])
        self.rows.append(tuple(t.detach().float().index_select(0, idx.to(t.device)) for t in tensors))
        if sum(len(k) for k in self.keys) >= self.k:
            kth = torch.cat(self.keys).kthvalue(self.k).values
            chunks = [(k <= kth, k, rows) for k, rows in zip(self.keys, self.rows)]
            self.keys = [k[m] for m, k, _ in chunks if m.any()]
            self.rows = [tuple(t[m.to(t.device)] for t in rows) for m, _, rows in chunks if m.any()]
            self.threshold = float(kth)

    def groups(self) -> list[tuple[torch.Tensor, ...]]:
        """The kept rows, concatenated in stream order per row shape (one group unless the shapes vary)."""
        by_shape: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        for rows in self.rows:
            by_shape.setdefault(tuple(t.shape[1:] for t in rows), []).append(rows)
        return [tuple(torch.cat(parts) for parts in zip(*chunks)) for chunks in by_shape.values()]

