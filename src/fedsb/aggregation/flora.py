"""FLoRA: stack the clients' adapters. The stacked product sum_i w_i B_i A_i is exact; every
client downloads all stacked adapters (traffic grows with the number of clients), merges them
into its base weights, and starts the next round from a fresh seeded LoRA init."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedsb.aggregation.base import Direction, Strategy, WireNames, lora_names, no_grad

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn


class FLoRA(Strategy, name="flora"):
    modifies_base = True
    user_level_dp_note = "it stacks every client's factors, so no noisy mean stands between a client and the model"
    display_name = "FLoRA"
    table_order = 4

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        """A, B up; the clients' adapters stacked along the rank axis down (same names, rank N r)."""
        return lora_names(module, d_out, d_in, rank if direction == "up" else clients * rank)

    @classmethod
    def comm_params(cls, modules: list[tuple[str, int, int]], head: int, rank: int, clients: int) -> tuple[int, int]:
        n = clients * (sum(rank * (d_in + d_out) for _, d_out, d_in in modules) + head)  # every client's adapters
        return n, n

    def begin_round(self, model: nn.Module) -> None:
        super().begin_round(model)
        self._stack: dict[str, list[Tensor]] = {}

    def add(self, model: nn.Module, update: Mapping[str, Tensor], num_examples: int) -> None:
        w = self.client_weight(num_examples)
        self._total += w
        self._count += 1
        for key, value in update.items():
            if key.endswith(".lora_B"):  # the weight rides on B so that sum_i (w_i B_i) A_i is the mean
                value = value * w
            elif key.startswith("head."):
                self._sums[key] = self._sums.get(key, 0) + value.double() * w
                continue
            self._stack.setdefault(key, []).append(value.detach().float())

    @no_grad
    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        import torch  # slow dependency: the declarations above are read without it

        from fedsb.adapter.inject import adapter_layers  # imports torch (fedsb.adapter)
        from fedsb.adapter.layer import LoraLinear  # imports torch (fedsb.adapter)

        download: dict[str, Tensor] = {}
        g = self._reset_generator(round_index + 1)  # the init of the round that downloads this
        for name, layer in adapter_layers(model).items():
            a_stack = torch.cat(self._stack[f"{name}.lora_A"], dim=0)  # (N r) x d_in
            b_stack = torch.cat(self._stack[f"{name}.lora_B"], dim=1) / self._total  # d_out x (N r)
            _merge(layer, a_stack, b_stack)
            # Same names as the adapter, stacked to rank N * r (as `comm_table.payload_names`).
            download[f"{name}.lora_A"] = a_stack
            download[f"{name}.lora_B"] = b_stack
            assert isinstance(layer, LoraLinear)
            layer.reset(g)  # every client draws the same fresh init from the shared seed
        heads = {k: (v / self._total).float() for k, v in self._sums.items()}
        self.load_global(model, heads)
        download.update(heads)
        self._stack = {}
        return download

    def downloads_start_value(self, key: str) -> bool:
        # With one client the stack has the adapter's own shape; it is still a stack.
        return key.startswith("head.")

    def _reset_generator(self, round_index: int) -> torch.Generator:
        """The shared seed of the fresh LoRA init that round `round_index` starts from."""
        import torch  # slow dependency

        return torch.Generator(device="cpu").manual_seed(self.seed * 7919 + round_index)  # same init on every device

    @no_grad
    def apply_download(self, model: nn.Module, download: Mapping[str, Tensor], round_index: int, *, fold: bool = True) -> None:
        """A client merges the downloaded stacks into its base weights and restarts from the
        fresh seeded LoRA, exactly as `finish` did. Round 0's download is the seeded init itself."""
        from fedsb.adapter.inject import adapter_layers  # slow dependency (torch)
        from fedsb.adapter.layer import LoraLinear  # imports torch (fedsb.adapter)

        if round_index == 0:
            return
        g = self._reset_generator(round_index)
        for name, layer in adapter_layers(model).items():
            assert isinstance(layer, LoraLinear)
            if fold:
                _merge(layer, download[f"{name}.lora_A"], download[f"{name}.lora_B"])
            layer.reset(g)


def _merge(layer: nn.Module, a_stack: Tensor, b_stack: Tensor) -> None:
    """W += scaling * B_stack A_stack (B_stack already carries the weights w_i / sum w)."""
    delta = (b_stack.double() @ a_stack.double() * layer.scaling).float()
    w = layer.base_layer.weight  # the stacks come from decoded (host) uploads
    w.add_(delta.to(device=w.device, dtype=w.dtype))
