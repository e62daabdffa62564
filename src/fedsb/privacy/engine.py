"""Sample-level DP-SGD on the shared model: opacus' PrivacyEngine, attached for one client-round.

The federation keeps ONE model for all simulated clients, so opacus must not replace it with a
`GradSampleModule` wrapper that outlives the client. `PrivateSession` therefore attaches
opacus' hooks to the model in place (`wrap_model=False`), and on exit removes them and every
attribute opacus put on parameters and modules: R (and the head) keep their identity and their
values, and the next client (or the evaluation) sees a plain model.

Sampling is opacus' Poisson sampling (each example joins a step's logical batch independently
with probability q = 1 / ceil(n / batch_size)), drawn over example indices so that
variable-length token sequences need no opacus-specific collation. Only AFTER the draw is the
logical batch cut into physical micro-batches of at most `physical_batch_size`; given the
examples' `lengths`, the drawn examples are first sorted by length, so each micro-batch is
padded to a similar width (dynamic padding). Reordering and splitting a drawn batch changes
neither which examples a step sees nor its clipped sum, so the sampling distribution, and with
it the accounting, is unchanged.

Precision (`precision`): "fp32" runs everything in fp32 (the old path). "bf16" runs the frozen
encoder under bf16 autocast while every trainable module computes in fp32: each trainable
`nn.Linear` (LoRA-SB's R, the head) has autocast switched off and its input upcast
(`Fp32Linear`), so its activations, its backprops and the per-sample gradients opacus forms
from them are fp32; the LoRA baselines' grad sampler upcasts to fp32 too. Clipping, noise and
the optimizer act on fp32 tensors. The frozen linear layers use a bf16 copy of their weight
made once per session (`FrozenBf16Linear`). The sensitivity bound holds either way: opacus
clips the per-sample gradients it computed and sums exactly those, whatever arithmetic
produced them. `dropout=False` switches the frozen encoder's dropout off for the session (a
training choice, common in DP fine-tuning; the accounting is the same).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers.utils import params as optimizer_params
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedsb.adapter.layer import LoraLinear
from fedsb.privacy import samplers as _samplers  # noqa: F401  (registers LoraLinear's grad sampler)
from fedsb.precision import autocast_context, resolve_precision
from fedsb.privacy.accounting import PrivacyError, poisson_sample_rate
from fedsb.privacy.samplers import physical_batches, precision_islands

GRAD_SAMPLE_MODES = {"flat": "hooks", "per_layer": "hooks", "ghost": "ghost"}
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


class SequenceLoss(nn.Module):
    """Cross-entropy with one value per example, the privacy unit.

    Classification logits (B, C) with labels (B,); causal-LM logits (B, T, V) with labels
    (B, T) (-100 ignored) give each sequence's mean token loss. `reduction` is what opacus'
    ghost clipping switches to "none" to get per-example losses.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() == 2:
            per = F.cross_entropy(logits.float(), labels, reduction="none")
        else:
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            tok = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none")
            count = (shift_labels != -100).sum(1).clamp(min=1)
            per = tok.view(shift_labels.shape).sum(1) / count
        if self.reduction == "none":
            return per
        return per.mean() if self.reduction == "mean" else per.sum()


def check_compatible(model: nn.Module) -> None:
    """Fail early, naming the layer, where opacus cannot bound one example's gradient."""
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if errors:
            raise PrivacyError(f"opacus cannot train layer {name!r} ({type(module).__name__}) privately: {errors[0]}")
        if next(module.buffers(), None) is not None:
            raise PrivacyError(
                f"opacus cannot compute per-sample gradients for layer {name!r} ({type(module).__name__}): it is "
                "trainable and has buffers (state shared across examples, e.g. running statistics); freeze it or "
                "replace it"
            )
        if isinstance(module, LoraLinear) and not isinstance(module.dropout, nn.Identity):
            raise PrivacyError(
                f"layer {name!r}: adapter dropout > 0 is not supported under DP for LoRA baselines (the per-sample "
                "gradient formula needs the dropout mask); set adapter.dropout = 0"
            )
        bad = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if bad:
            raise PrivacyError(f"layer {name!r}: trainable tensor {bad[0]!r} must be fp32 under DP")


# torch's bf16 flash-attention backward on the CPU was half of a bf16 DP step of MiniLM (SNLI
# pairs, ~30 tokens); the eager attention (two batched matmuls and a softmax) is faster there.
CPU_BF16_ATTENTION = "eager"


def _set_attention(model: nn.Module, impl: str) -> str | None:
    """Switch a transformers model that uses SDPA to `impl`; returns what to restore, or None."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if current is None or current == impl or not hasattr(model, "set_attn_implementation"):
        return None
    if impl != "sdpa" and current != "sdpa":
        return None  # only SDPA is replaced (flash-attention or custom kernels stay)
    model.set_attn_implementation(impl)
    return current


@dataclass
class PrivateStepStats:
    steps: int
    mean_loss: float
    tokens: int
    examples: int
    empty_batches: int


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence opacus' advice-level warnings (no secure RNG; the first adapter's input needs no grad)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class PrivateSession:
    """Opacus attached to `model` and `optimizer` for one client-round (a context manager).

    `history` is the party's accountant history so far; after the session `self.history`
    holds it with this session's steps added.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        batch_size: int,
        physical_batch_size: int,
        noise_multiplier: float,
        max_grad_norm: float,
        clipping: str = "flat",
        history: Sequence[Sequence[float]] = (),
        noise_seed: int | None = None,
        precision: str = "fp32",
        lengths: Sequence[int] | None = None,
        dropout: bool = True,
    ) -> None:
        if clipping not in GRAD_SAMPLE_MODES and clipping != "functorch":
            raise PrivacyError(f"clipping {clipping!r}: allowed values are {', '.join(GRAD_SAMPLE_MODES)}")
        if num_examples <= 0 or batch_size <= 0 or physical_batch_size <= 0:
            raise PrivacyError("num_examples, batch_size and physical_batch_size must be > 0")
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise PrivacyError(f"noise multiplier must be >= 0 and max grad norm > 0, got {noise_multiplier}, {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.physical_batch_size = physical_batch_size
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        # "functorch" (opacus' generic fallback for every layer) is for tests and benchmarks.
        self.grad_sample_mode = GRAD_SAMPLE_MODES.get(clipping, clipping)
        self.clipping = clipping
        self._initial_history = [tuple(e) for e in history]
        self.noise_seed = noise_seed
        if lengths is not None and len(lengths) != num_examples:
            raise PrivacyError(f"lengths: {len(lengths)} values for {num_examples} examples")
        self.lengths = None if lengths is None else list(lengths)
        device = next(model.parameters()).device
        self.precision = resolve_precision(precision, device)
        if self.grad_sample_mode != "hooks":
            self.precision = "fp32"  # the bf16 islands are for opacus' hooks; ghost / functorch stay fp32
        self.dropout = dropout
        self.loss = SequenceLoss()
        self._engine: PrivacyEngine | None = None

    # --- attach / detach -----------------------------------------------------------------

    def __enter__(self) -> "PrivateSession":
        check_compatible(self.model)
        self.model.train()
        self._islands = precision_islands(self.model, dropout=self.dropout) if self.precision == "bf16" or not self.dropout else None
        self._attention = None
        if self.precision == "bf16" and next(self.model.parameters()).device.type == "cpu":
            self._attention = _set_attention(self.model, CPU_BF16_ATTENTION)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        opacus_clipping, max_grad_norm = self._clipping_bounds()
        index = DataLoader(TensorDataset(torch.arange(self.num_examples, device="cpu")), batch_size=self.batch_size)  # host-side index
        self.sample_rate = 1.0 / len(index)
        assert self.sample_rate == poisson_sample_rate(self.num_examples, self.batch_size)
        # opacus draws the noise on the parameters' device, with this generator: it must live there.
        device = self._params[0].device if self._params else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(self.noise_seed) if self.noise_seed is not None else None
        with _quiet():
            self._engine = PrivacyEngine(accountant="rdp")
            self._engine.accountant.history = list(self._initial_history)
            out = self._engine.make_private(
                module=self.model,
                optimizer=self.optimizer,
                criterion=self.loss,
                data_loader=index,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
                clipping=opacus_clipping,
                grad_sample_mode=self.grad_sample_mode,
                wrap_model=False,
                noise_generator=generator,
            )
        if self.grad_sample_mode == "ghost":
            self._hooks, self.dp_optimizer, self._criterion, self.loader = out
        else:
            self._hooks, self.dp_optimizer, self.loader = out
            self._criterion = self.loss
        return self

    def _clipping_bounds(self) -> tuple[str, float | list[float]]:
        """opacus' clipping mode and its bound(s).

        "per_layer": each of the K trainable tensors is clipped on its own to C / sqrt(K), so one
        example's whole gradient still has norm <= C (the sensitivity the noise is calibrated to:
        opacus adds noise of std sigma * sqrt(sum of the bounds squared) = sigma * C). For models
        where one tensor's gradient dwarfs the rest: under one flat bound it takes the budget (a
        MiniLM head trained from scratch has 10x the per-example gradient norm of all LoRA-SB R's
        together). On SNLI it did not beat flat clipping (docs/privacy.md).
        """
        if self.clipping != "per_layer":
            return "flat", self.max_grad_norm
        n = len(optimizer_params(self.optimizer))  # opacus' own list: one bound per tensor, in its order
        return "per_layer", [self.max_grad_norm / n**0.5] * n

    def __exit__(self, *exc: Any) -> None:
        self._hooks.cleanup()
        if self._islands is not None:
            self._islands.restore()
        if self._attention is not None:
            _set_attention(self.model, self._attention)
        for p in self._params:
            p.grad = None
            for attr in _OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for module in self.model.modules():
            for attr in _OPACUS_MODULE_ATTRS:
                if attr in module.__dict__:
                    delattr(module, attr)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history: what came in plus this session's steps."""
        assert self._engine is not None, "use PrivateSession as a context manager"
        return [tuple(e) for e in self._engine.accountant.history]

    # --- training ------------------------------------------------------------------------

    def _empty_backward(self) -> None:
        """A Poisson batch with no example still takes a (noise-only) step: it is accounted."""
        for p in self._params:
            if self.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def train(
        self,
        *,
        steps: int,
        make_batch: Callable[[list[int]], Mapping[str, Tensor]],
        lr_for_step: Callable[[int], float],
        first_step: int = 0,
        on_step: Callable[[float], None] | None = None,
    ) -> PrivateStepStats:
        """`steps` DP-SGD steps, each on a fresh Poisson sample of the example indices."""
        opt = self.dp_optimizer
        device = next(self.model.parameters()).device
        done, tokens, examples, empty = 0, 0, 0, 0
        losses: list[float] = []
        loss_sum, loss_n = 0.0, 0
        while done < steps:
            for idx in physical_batches(self.loader, self.physical_batch_size, opt, self.lengths):
                for group in opt.param_groups:
                    group["lr"] = lr_for_step(first_step + done)
                if not idx:
                    self._empty_backward()
                else:
                    batch = {k: v.to(device) for k, v in make_batch(idx).items()}
                    loss = self._forward_backward(batch, first_step + done)
                    n = len(idx)
                    loss_sum, loss_n = loss_sum + loss * n, loss_n + n
                    examples += n
                    tokens += int(batch["attention_mask"].sum())
                opt.step()
                stepped = not opt._is_last_step_skipped
                opt.zero_grad(set_to_none=True)
                if not stepped:
                    continue
                done += 1
                if loss_n:
                    losses.append(loss_sum / loss_n)
                else:
                    empty += 1
                if on_step is not None:
                    on_step(losses[-1] if loss_n else float("nan"))
                loss_sum, loss_n = 0.0, 0
                if done == steps:
                    break
        return PrivateStepStats(
            steps=done,
            mean_loss=sum(losses) / len(losses) if losses else float("nan"),
            tokens=tokens,
            examples=examples,
            empty_batches=empty,
        )

    def _forward_backward(self, batch: Mapping[str, Tensor], step: int) -> float:
        """One micro-batch: the encoder under the session's autocast, the loss in fp32."""
        with autocast_context(batch["labels"].device, self.precision):
            logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = self._criterion(logits, batch["labels"])
        value = float(loss.detach())
        if value != value or value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"private training loss is {value} at step {step}")
        with _quiet():
            loss.backward()
        return value

    def sample_gradient_norms(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example norms of the (unclipped) gradient over every trainable tensor, for one batch.

        What opacus clips; for tests and diagnostics. Leaves no gradient behind.
        """
        device = next(self.model.parameters()).device
        self._forward_backward({k: v.to(device) for k, v in batch.items()}, -1)
        flat = [self.dp_optimizer._get_flat_grad_sample(p).flatten(1) for p in self._params]
        norms = torch.cat(flat, dim=1).norm(dim=1)
        self.dp_optimizer.zero_grad(set_to_none=True)
        for p in self._params:
            p.grad_sample = None
        return norms
