"""The aggregation interface. A strategy is one small class in its own file, which registers
itself by name: `class FedSB(Strategy, name="fedsb")`.

The server folds each client's update into a running weighted sum as it arrives
(`add`), so memory does not grow with the number of clients (FLoRA excepted: stacking is the
method). `finish` applies the aggregate to the global model and returns the payload every
client downloads at the start of the next round.

torch is imported inside the methods that compute, never at module level: a strategy's
declarations (class attributes, `wire_names`, `comm_params`) are read by `fedsb comm` and the
config checks, which must start without torch (a slow dependency).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from fedsb.aggregation.registry import add_strategy

if TYPE_CHECKING:
    from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """`torch.no_grad()` as a decorator, with torch imported at call time (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch  # slow dependency: only when a strategy computes

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def weighted_sum_into(sums: dict[str, Tensor], update: Mapping[str, Tensor], weight: float) -> None:
    """sums[k] += weight * update[k], creating the entry on first use (fp64 for exactness)."""
    for key, value in update.items():
        acc = sums.get(key)
        if acc is None:
            sums[key] = value.detach().double() * weight
        else:
            acc.add_(value.detach().double(), alpha=weight)


def weighted_mean(sums: Mapping[str, Tensor], total_weight: float) -> dict[str, Tensor]:
    if total_weight <= 0:
        raise ValueError("no client update to aggregate")
    return {k: (v / total_weight).float() for k, v in sums.items()}


Direction = Literal["up", "down"]
WireNames = list[tuple[str, tuple[int, ...]]]


def lora_names(module: str, d_out: int, d_in: int, rank: int) -> WireNames:
    """A LoRA pair's wire names and shapes: "<m>.lora_A" (r x d_in), "<m>.lora_B" (d_out x r)."""
    return [(f"{module}.lora_A", (rank, d_in)), (f"{module}.lora_B", (d_out, rank))]


class Strategy(ABC):
    """One aggregation rule. Subclasses set the class attributes and implement `finish`.

    The class attributes and class methods declare what a strategy *is*, so the rest of the code
    (communication tables, the Flower checks, the results tables, the DP checks) reads them
    from the registry instead of testing names: adding a strategy is one file.
    """

    name: ClassVar[str]
    display_name: ClassVar[str] = ""  # in tables ("Fed-SB", "FedEx-LoRA", ...)
    table_order: ClassVar[int] = 100  # position in tables
    adapter_kind: ClassVar[str] = "lora"  # "lorasb" or "lora"
    train_a: ClassVar[bool] = True  # LoRA baselines: does A train?
    modifies_base: ClassVar[bool] = False  # folds something into the frozen weights
    exact: ClassVar[bool] = True
    # What the engines may do with it (read by the Flower checks and the DP checks):
    supports_secagg: ClassVar[bool] = False  # its aggregate is the weighted mean SecAgg+ computes
    secagg_note: ClassVar[str] = "SecAgg+ is wired for strategies whose aggregate is a plain weighted mean of R (Fed-SB)"
    user_level_dp_note: ClassVar[str] = ""  # non-empty: why user-level DP (noise on the mean) cannot cover it
    # The strategy whose cumulative traffic `fedsb comm` compares this one's against (the round
    # after which this one's total, one-time costs included, drops below it); None: no comparison.
    break_even_reference: ClassVar[str | None] = None

    # --- what travels (the single source of wire names; `fedsb.federated.comm_table`) ---------

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        """The tensors one adapted module contributes to one client's upload or download."""
        raise NotImplementedError(f"strategy {cls.__name__} does not declare its wire names")

    @classmethod
    def comm_params(cls, modules: list[tuple[str, int, int]], head: int, rank: int, clients: int) -> tuple[int, int]:
        """(count, the Fed-SB paper's count) of trainable numbers communicated per client and
        round (FedEx/FLoRA: summed over clients, as the paper tabulates them)."""
        n = sum(rank * (d_in + d_out) for _, d_out, d_in in modules) + head
        return n, n

    @classmethod
    def one_time_init(cls) -> bool:
        """Whether a data-driven init ships frozen factors once (LoRA-SB's B, A); the LoRA
        baselines draw A from a shared seed instead."""
        return cls.adapter_kind == "lorasb"

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        """`class X(Strategy, name="x")` registers X under "x"; a subclass without a name does not."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            add_strategy(name, cls)

    def __init__(self, *, weighted: bool = True, head_modules: list[str] | None = None, seed: int = 0) -> None:
        self.weighted = weighted
        self.head_modules = list(head_modules or [])
        self.seed = seed
        self._sums: dict[str, Tensor] = {}
        self._total = 0.0
        self._count = 0

    def client_weight(self, num_examples: int) -> float:
        return float(num_examples) if self.weighted else 1.0

    def begin_round(self, model: nn.Module) -> None:
        self._sums, self._total, self._count = {}, 0.0, 0

    def add(self, model: nn.Module, update: Mapping[str, Tensor], num_examples: int) -> None:
        """Fold one client's decoded upload into the running sums."""
        w = self.client_weight(num_examples)
        weighted_sum_into(self._sums, update, w)
        self._total += w
        self._count += 1

    @abstractmethod
    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        """Apply the aggregate to `model`; return what every client downloads next round."""

    # --- helpers shared by the strategies -------------------------------------------------

    def mean_update(self) -> dict[str, Tensor]:
        return weighted_mean(self._sums, self._total)

    def download_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The global trainable tensors (what a client loads before training)."""
        from fedsb.adapter.inject import trainable_state  # slow dependency (torch)

        return trainable_state(model, self.head_modules)

    def load_global(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        from fedsb.adapter.inject import load_state  # slow dependency (torch)

        load_state(model, dict(state), self.head_modules, strict_keys=False)

    def client_start_state(self, model: nn.Module, download: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What a client trains from: the model's trainable tensors, replaced by the downloaded
        values (as decoded, wire dtype included) wherever the download carries that tensor."""
        from fedsb.adapter.inject import trainable_state  # slow dependency (torch)

        state = trainable_state(model, self.head_modules)
        for key, value in download.items():
            if key in state and value.shape == state[key].shape and self.downloads_start_value(key):
                state[key] = value
        return state

    def downloads_start_value(self, key: str) -> bool:
        """Whether the download's tensor `key` is the value clients start from (FLoRA's stacks,
        named like the adapter, are merged into the base instead)."""
        return True

    def apply_download(self, model: nn.Module, download: Mapping[str, Tensor], round_index: int, *, fold: bool = True) -> None:
        """What a *client* does with the download of round `round_index` besides loading the
        trainable tensors: strategies that modify the base fold their part of it into the base
        weights, as `finish` did on the server. `fold=False`: the base already holds it (a node
        that restored its folded base), only the rest happens. Nothing to do by default.

        The in-process engine never calls this (its clients share the server's model, whose base
        `finish` already changed); a node of the Flower engine does, once per round.
        """

    def head_keys(self, model: nn.Module) -> list[str]:
        from fedsb.adapter.inject import head_parameters  # slow dependency (torch)

        return list(head_parameters(model, self.head_modules))

    def prepare(self, model: nn.Module) -> None:
        """Called once after the adapters exist (e.g. seeded init of LoRA baselines)."""
        import torch  # slow dependency

        from fedsb.adapter.inject import adapter_layers  # imports torch (fedsb.adapter)
        from fedsb.adapter.layer import LoraLinear  # imports torch (fedsb.adapter)

        g = torch.Generator(device="cpu").manual_seed(self.seed)  # host draw: the same init on every device
        for layer in adapter_layers(model).values():
            if isinstance(layer, LoraLinear):
                layer.reset(g)
