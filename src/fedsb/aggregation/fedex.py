"""FedEx-LoRA: average A and B, and fold the residual mean(B_i A_i) - mean(B) mean(A) into W.

The residual is a full d_out x d_in matrix per module that every client must download: the
download payload carries it, so the communication accounting counts it.

Between `add` calls the server keeps only what it received: each client's factors B_i, A_i
(r (d_in + d_out) numbers per layer) and its weight. `finish` forms the dense fp64 products one
layer at a time, so the dense working set is one layer's product and sum, never the whole model's
(55.8 GB of fp64 sums for Mistral-7B at rank 32 on all linear layers, docs/gpu.md). The sum runs
over the clients in the order they were added, with the same operations as a running sum, so the
residual is bit-identical to accumulating the products in `add`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedsb.aggregation.base import Direction, Strategy, WireNames, lora_names, no_grad

if TYPE_CHECKING:
    from torch import Tensor, nn


class FedExLoRA(Strategy, name="fedex"):
    modifies_base = True
    user_level_dp_note = "its server folds mean(B_i A_i), a per-client product the noise on the mean does not cover"
    display_name = "FedEx-LoRA"
    table_order = 3

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        """A, B up; mean A, mean B and the residual (d_out x d_in) down."""
        pair = lora_names(module, d_out, d_in, rank)
        return pair if direction == "up" else [*pair, (f"{module}.residual", (d_out, d_in))]

    @classmethod
    def comm_params(cls, modules: list[tuple[str, int, int]], head: int, rank: int, clients: int) -> tuple[int, int]:
        n = clients * (sum(rank * (d_in + d_out) for _, d_out, d_in in modules) + head)  # every client's adapters
        return n, n

    def begin_round(self, model: nn.Module) -> None:
        super().begin_round(model)
        # Per client, in arrival order: (weight, {layer: (B_i, A_i)}), the factors as received.
        self._factors: list[tuple[float, dict[str, tuple[Tensor, Tensor]]]] = []

    def add(self, model: nn.Module, update: Mapping[str, Tensor], num_examples: int) -> None:
        from fedsb.adapter.inject import adapter_layers  # slow dependency (torch)

        super().add(model, update, num_examples)
        w = self.client_weight(num_examples)
        # Copies: the caller may reuse its tensors (e.g. a model's own parameters) after `add`.
        self._factors.append(
            (w, {name: (update[f"{name}.lora_B"].detach().clone(), update[f"{name}.lora_A"].detach().clone()) for name in adapter_layers(model)})
        )

    @no_grad
    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        from fedsb.adapter.inject import adapter_layers  # slow dependency (torch)

        mean = self.mean_update()
        download = dict(mean)
        for name, layer in adapter_layers(model).items():
            # sum_i w_i B_i A_i in fp64, clients in arrival order (`_weighted_product_sum`).
            mean_product = _weighted_product_sum(self._factors, name).div_(self._total)
            product_of_means = mean[f"{name}.lora_B"].double() @ mean[f"{name}.lora_A"].double()
            # The scaling alpha/r applies to the residual exactly as it did in training.
            residual = mean_product.sub_(product_of_means).mul_(layer.scaling).float()
            del mean_product, product_of_means  # one layer's dense fp64 tensors at a time
            _fold(layer, residual)
            download[f"{name}.residual"] = residual
        self.load_global(model, mean)
        self._factors = []
        return download

    @no_grad
    def apply_download(self, model: nn.Module, download: Mapping[str, Tensor], round_index: int, *, fold: bool = True) -> None:
        """A client folds the downloaded residuals into its base weights, exactly as `finish`."""
        from fedsb.adapter.inject import adapter_layers  # slow dependency (torch)

        if not fold:
            return
        for name, layer in adapter_layers(model).items():
            residual = download.get(f"{name}.residual")
            if residual is not None:  # round 0's download (the seeded init) carries none
                _fold(layer, residual)


def _fold(layer: nn.Module, residual: Tensor) -> None:
    w = layer.base_layer.weight  # the residual comes from decoded (host) uploads
    w.add_(residual.to(device=w.device, dtype=w.dtype))


def _weighted_product_sum(factors: list[tuple[float, dict[str, tuple[Tensor, Tensor]]]], name: str) -> Tensor:
    """sum_i w_i (B_i A_i) for layer `name`, fp64, as a running sum over the clients in order:
    the first client's product times its weight, then `add_(product, alpha=w)`. Each client's
    factors of this layer are released once used."""
    acc: Tensor | None = None
    for w, layers in factors:
        b, a = layers.pop(name)
        product = b.double() @ a.double()
        if acc is None:
            acc = product * w
        else:
            acc.add_(product, alpha=w)
        del product
    if acc is None:
        raise ValueError("no client update to aggregate")
    return acc
