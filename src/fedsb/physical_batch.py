"""The physical batch is fedsb's choice; the logical batch and the loss are the user's.

One optimizer step averages `grad_accum` micro-batches of `batch_size` rows, each micro-batch's
loss being the mean cross-entropy over its own supervised tokens (transformers' `ForCausalLMLoss`):

    loss = 1/G * sum_m ( sum_{tokens of m} ce / n_m )          G micro-batches, n_m tokens in m

That sum does not care which rows share a forward pass. So the rows of a step are re-cut into
physical batches, sorted by length (little padding), as large as the budget allows (rows and
padded tokens per forward), and each row's summed cross-entropy is weighted by 1 / (n_m G) of the
micro-batch it came from. The update is the same (up to float summation order) whether a step
runs as 4 forwards of 1 row or 1 forward of 4 rows; a small batch then runs at a large batch's
speed, and a large one is split where its activations would not fit.

Packing (`pack=True`, for causal LMs whose attention keeps packed sequences apart, see
`fedsb.training.supports_packing`): a physical batch is then one row, the rows laid end to end
with their positions restarting at 0, so no forward computes padding. Each token carries the
weight of its row, and the token that starts a row is not predicted from the previous row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PhysicalBatch:
    """Rows from one or more micro-batches, right-padded, with each row's loss weight."""

    batch: dict[str, Tensor]
    row_weight: Tensor  # fp32 (rows,): 1 / (supervised tokens of the row's micro-batch * G)
    token_weight: Tensor | None = None  # packed: fp32 (1, tokens), the weight of each token's row


def supports_repacking(batch: Mapping[str, Tensor]) -> bool:
    """Causal LM batches (2-D labels shaped like input_ids, an attention mask) can be re-cut."""
    labels, ids = batch.get("labels"), batch.get("input_ids")
    return (
        labels is not None and ids is not None and "attention_mask" in batch
        and labels.dim() == 2 and labels.shape == ids.shape
    )


def supervised_tokens(labels: Tensor) -> int:
    """Tokens the causal LM loss counts: labels of positions 1.. that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def plan_physical_batches(
    micro_batches: Sequence[Mapping[str, Tensor]], *, max_rows: int, max_tokens: int, pad_id: int = 0,
    pack: bool = False,
) -> list[PhysicalBatch]:
    """Re-cut one optimizer step's micro-batches into physical batches.

    `max_rows` (0: no limit) and `max_tokens` (tokens per forward, padding included, the
    activation budget; 0: no limit) bound each physical batch; a row longer than `max_tokens`
    still runs, alone. `pack`: each physical batch is one packed row (see the module docstring).
    Raises FloatingPointError when a micro-batch has no supervised token (its mean loss is NaN).
    """
    g = len(micro_batches)
    rows: list[tuple[int, dict[str, Tensor], float]] = []  # (length, row tensors, weight)
    for m, mb in enumerate(micro_batches):
        n = supervised_tokens(mb["labels"])
        if n == 0:
            raise FloatingPointError(
                f"micro-batch {m} of a step has no supervised token (response cut by train.max_length?)"
            )
        lengths = mb["attention_mask"].sum(dim=1).tolist()
        for r, length in enumerate(lengths):
            rows.append((int(length), {k: v[r, : int(length)] for k, v in mb.items()}, 1.0 / (n * g)))
    rows.sort(key=lambda row: row[0])  # stable: equal lengths keep their order
    chunks: list[list[tuple[int, dict[str, Tensor], float]]] = []
    for row in rows:
        current = chunks[-1] if chunks else None
        fits = current is not None and (max_rows <= 0 or len(current) < max_rows) and (
            max_tokens <= 0 or _tokens_with(current, row[0], pack) <= max_tokens
        )
        if fits:
            current.append(row)  # type: ignore[union-attr]
        else:
            chunks.append([row])
    return [_pack(chunk) if pack else _pad(chunk, pad_id) for chunk in chunks]


def _tokens_with(chunk: list[tuple[int, dict[str, Tensor], float]], length: int, pack: bool) -> int:
    """Tokens in one forward once a row of `length` joins `chunk` (padded: rows come sorted,
    so the new row is the longest)."""
    return sum(n for n, _, _ in chunk) + length if pack else (len(chunk) + 1) * length


def _pack(chunk: list[tuple[int, dict[str, Tensor], float]]) -> PhysicalBatch:
    ids = torch.cat([row["input_ids"] for _, row, _ in chunk])
    labels = torch.cat([row["labels"] for _, row, _ in chunk])
    positions = torch.cat([torch.arange(length, device="cpu") for length, _, _ in chunk])  # host batch
    weights = torch.cat([torch.full((length,), w, dtype=torch.float32, device="cpu") for length, _, w in chunk])
    labels[positions == 0] = IGNORE_INDEX  # a row's first token is not predicted from the row before
    batch = {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None]}
    return PhysicalBatch(batch, torch.tensor([w for _, _, w in chunk], dtype=torch.float32, device="cpu"), weights[None])


def _pad(chunk: list[tuple[int, dict[str, Tensor], float]], pad_id: int) -> PhysicalBatch:
    width = max(length for length, _, _ in chunk)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    batch: dict[str, Tensor] = {}
    for key in chunk[0][1]:
        first = chunk[0][1][key]
        out = torch.full((len(chunk), width), fill.get(key, 0), dtype=first.dtype, device=first.device)
        for i, (length, row, _) in enumerate(chunk):
            out[i, :length] = row[key]
        batch[key] = out
    return PhysicalBatch(batch, torch.tensor([w for _, _, w in chunk], dtype=torch.float32, device="cpu"))
