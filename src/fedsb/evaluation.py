"""Fast evaluation: batched greedy generation, option ranking by log-likelihood, accuracy.

Speed matters because evaluation runs after every federated round on a CPU: prompts are
sorted by length so a batch wastes little padding, a sequence leaves its batch (and the KV
cache) as soon as it hits EOS or a stop string, and on hardware with native bf16 the weights
are cast to bf16 for the duration of the call.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsb.adapter.merge import merged_adapters
from fedsb.tasks.base import EvalExample, Task
from fedsb.tasks.prompts import render_prompt

PRECISIONS = ("auto", "fp32", "bf16", "autocast")


# --------------------------------------------------------------------------- helpers

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sane at 0% and 100%, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _bf16_native(device: torch.device) -> bool:
    from fedsb.precision import native_bf16  # the one place that probes devices for bf16

    return native_bf16(device)


def inference_precision(model: torch.nn.Module, precision: str) -> str:
    """How to run: "as_is", "bf16" (weights cast for the call) or "autocast" (bf16 autocast).

    "auto" means "bf16" where the hardware does bf16 natively and the model is stored in fp32
    (emulated bf16 is slower than fp32). "bf16" beats autocast for generation: autocast re-casts
    activations around every op and frozen weights on every call, which dominates a decode
    step on CPU (measured 2-3x slower steps than bf16 weights, no faster than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "as_is"
    if precision in ("bf16", "autocast"):
        return precision
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float32:
        return "as_is"
    return "bf16" if _bf16_native(_device(model)) else "as_is"


@contextlib.contextmanager
def bf16_weights(model: torch.nn.Module) -> Iterator[None]:
    """fp32 parameters temporarily in bf16; the originals come back, not a lossy round trip.

    Buffers (e.g. rotary frequencies) stay fp32. Costs one bf16 copy of the weights.
    """
    saved = []
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32:
                saved.append((p, p.data))
                p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.data = data


@contextlib.contextmanager
def contiguous_head_input(model: torch.nn.Module) -> Iterator[None]:
    """Make the LM head's input contiguous for the call.

    With `logits_to_keep=1` the head gets `hidden[:, -1:, :]`, a strided view; on CPU in bf16,
    `linear` then cannot fold the batch into one matmul and broadcasts the (tied, 49k x 576)
    weight to every row before a bmm: a copy of batch x 28M values that took 77% of a bf16
    prefill (measured: 32 of 42 s for 8 GSM8K prompts). A contiguous input takes the plain mm.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _inference(model: torch.nn.Module, precision: str, merge: bool = False) -> Iterator[None]:
    """eval mode + inference_mode + the precision; restores training mode and weights.

    merge: fold the adapters into the base weights (computed in fp32, stored in the inference
    dtype) for the call; the original weights come back bit for bit (`fedsb.adapter.merge`).
    """
    was_training = model.training
    mode = inference_precision(model, precision)
    merged = (
        merged_adapters(model, torch.bfloat16 if mode == "bf16" else None)
        if merge
        else contextlib.nullcontext()
    )
    weights = bf16_weights(model) if mode == "bf16" else contextlib.nullcontext()
    cast = (
        torch.autocast(_device(model).type, dtype=torch.bfloat16)
        if mode == "autocast"
        else contextlib.nullcontext()
    )
    model.eval()
    try:
        with merged, weights, contiguous_head_input(model), torch.inference_mode(), cast:
            yield
    finally:
        model.train(was_training)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids; no second BOS when the text (e.g. a rendered chat template) starts with one."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def _pad_id(model: torch.nn.Module, tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                 getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(cand, list):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for cand in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                 tokenizer.eos_token_id):
        if isinstance(cand, int):
            ids.add(cand)
        elif cand:
            ids.update(int(c) for c in cand)
    return ids


def _left_pad(
    seqs: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")  # built on the host, moved once
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def truncate_at_stop(
    text: str, stop_strings: Sequence[str], stop_patterns: Sequence[str | re.Pattern[str]] = ()
) -> str:
    """`text` up to the earliest stop string (excluded) or stop-pattern match (included)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if s and 0 <= i < cut:
            cut = i
    for pat in stop_patterns:
        m = re.search(pat, text)
        if m and m.end() < cut:
            cut = m.end()
    return text[:cut]


def _progress(enabled: bool, label: str) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (  # noqa: PLC0415 - only when drawing
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


# --------------------------------------------------------------------------- generation

@dataclass
class Generations:
    """Generated texts in input order, plus the token count for throughput figures."""

    texts: list[str]
    tokens: int
    wall_s: float


def _forward(model: torch.nn.Module, **kw: Any) -> Any:
    """One forward pass computing logits for the last position only, where supported."""
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:  # a wrapper without logits_to_keep
        return model(**kw)


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned (transformers 5 names it `cache`, older `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _growing_cache() -> Any:
    """A DynamicCache whose layers append in place (None when transformers lacks the hooks)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # slow dependency (transformers)
    except ImportError:  # pragma: no cover - older transformers
        return None

    class GrowingLayer(DynamicLayer):
        """Keys and values in a buffer with spare room: a new token is written in place, where
        DynamicLayer's `torch.cat` copies the whole cache on every decoding step (a fifth of a
        step's time at batch 32)."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buf: tuple[torch.Tensor, torch.Tensor] | None = None
            self._n = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, add = self._n, key_states.shape[-2]
            if self._buf is None or n + add > self._buf[0].shape[-2]:
                cap = max(2 * (n + add), n + add + 64)
                grown = []
                for old, new in zip(self._buf or (None, None), (key_states, value_states)):
                    t = new.new_empty((*new.shape[:-2], cap, new.shape[-1]))
                    if old is not None and n:
                        t[..., :n, :] = old[..., :n, :]
                    grown.append(t)
                self._buf = (grown[0], grown[1])
            self._buf[0][..., n:n + add, :] = key_states
            self._buf[1][..., n:n + add, :] = value_states
            self._n = n + add
            self.keys, self.values = self._buf[0][..., : self._n, :], self._buf[1][..., : self._n, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._n:
                self._buf = (self._buf[0][indices], self._buf[1][indices])
                self.keys, self.values = self._buf[0][..., : self._n, :], self._buf[1][..., : self._n, :]

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer or cache.layers:
        return None
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def _greedy_decode(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    stops: Sequence[str],
    patterns: Sequence[re.Pattern[str]] = (),
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch with the KV cache; new token ids per row.

    A row leaves the batch (and the cache) as soon as it emits EOS, completes a stop string
    or matches a stop pattern, so the remaining rows run cheaper where a step's cost grows
    with the rows still running. Patterns (regexes) are what `model.generate` cannot do.
    """
    rows = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens <= 0:
        return new
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    grown = _growing_cache()
    extra = {"cache": grown} if grown is not None else {}
    out = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    cache = _cache_of(out)
    last = pos[:, -1:]
    active = list(range(rows))
    # Tail of a row re-decoded each step: a stop string spans at most len(s) tokens (plus a
    # partial UTF-8 token or two); answer-line patterns fit in 64 tokens.
    window = max(max((len(s) + 2 for s in stops), default=0), 64 if patterns else 0)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)  # bf16 argmax is ~10x slower on CPU
        keep = []
        for r, (row, tok) in enumerate(zip(active, nxt.tolist())):
            new[row].append(tok)
            if tok in eos:
                continue
            if window:
                tail = tokenizer.decode(new[row][-window:], skip_special_tokens=True)
                if any(s in tail for s in stops) or any(p.search(tail) for p in patterns):
                    continue
            keep.append(r)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active) and hasattr(cache, "batch_select_indices"):
            sel = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(sel)
            nxt, mask, last = nxt[sel], mask[sel], last[sel]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        out = _forward(model, input_ids=nxt[:, None], attention_mask=mask, position_ids=last,
                       cache=cache, use_cache=True)
    return new


def _hf_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    stops: Sequence[str],
    pad_id: int,
) -> list[list[int]]:
    """The same through `model.generate` (reference; keeps finished rows in the batch)."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
    )
    if eos:
        kwargs["eos_token_id"] = sorted(eos)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        n = len(row)
        for t, tok in enumerate(row):
            if tok in eos or tok == pad_id:
                n = t + (1 if tok in eos else 0)
                break
        rows.append(row[:n])
    return rows


def generate_with_stats(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    stop_patterns: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = True,
    precision: str = "auto",
    engine: str = "fast",
    merge: bool = True,
) -> Generations:
    """`generate`, also returning how many tokens were generated (up to EOS/stop).

    engine="fast" is the shrinking-batch loop above; "hf" runs `model.generate`, which
    cannot stop on patterns (their truncation is applied afterwards, so texts agree).
    merge=True folds the adapters into the weights for the call (nothing trains meanwhile):
    one matmul per projection instead of four; merge=False runs the adapters as they are.
    """
    if engine not in ("fast", "hf"):
        raise ValueError(f"unknown engine {engine!r}; allowed: fast, hf")
    start = time.perf_counter()
    encoded = [_encode(tokenizer, p) for p in prompts]
    # Longest first: the biggest batch (most memory) runs first and padding stays small.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device, pad_id, eos = _device(model), _pad_id(model, tokenizer), _eos_ids(model, tokenizer)
    stops = [s for s in stop_strings if s]
    patterns = [re.compile(p) for p in stop_patterns]
    texts: list[str] = [""] * len(prompts)
    total = 0
    with _inference(model, precision, merge), _progress(progress, "generate") as bar:
        task_id = bar.add_task("gen", total=len(prompts), rate="") if bar else None
        for idx in _batches(order, batch_size):
            ids, mask = _left_pad([encoded[i] for i in idx], pad_id, device)
            if engine == "fast":
                rows = _greedy_decode(
                    model, tokenizer, ids, mask, max_new_tokens, eos, stops, patterns
                )
            else:
                rows = _hf_generate(model, tokenizer, ids, mask, max_new_tokens, eos, stops, pad_id)
            for row, i in zip(rows, idx):
                total += len(row)
                text = tokenizer.decode(row, skip_special_tokens=True)
                texts[i] = truncate_at_stop(text, stops, patterns)
            if bar is not None:
                rate = total / max(time.perf_counter() - start, 1e-9)
                bar.update(task_id, advance=len(idx), rate=f"{rate:.0f} tok/s")
    return Generations(texts, total, time.perf_counter() - start)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    stop_patterns: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = True,
    precision: str = "auto",
    engine: str = "fast",
    merge: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (in input order), cut before the first stop string
    or after the first match of a stop pattern (regex).

    Batched with left padding and the KV cache; a sequence leaves its batch once it has
    produced EOS or a stop string, and the batch ends when none is left.
    """
    return generate_with_stats(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
        stop_patterns=stop_patterns, batch_size=batch_size, progress=progress,
        precision=precision, engine=engine, merge=merge,
    ).texts


# --------------------------------------------------------------------------- log-likelihood

def _split_request(tokenizer: Any, context: str, option: str) -> tuple[list[int], int]:
    """(token ids of context+option, number of option tokens at the end).

    lm-evaluation-harness's `_encode_pair` (0.4.13): trailing whitespace moves from the context
    to the option (BPE vocabularies attach a space to the following word), the whole string is
    encoded, and the option's tokens are whatever it has beyond the context's own token count;
    the model sees the context's tokens followed by those. Only where that leaves nothing (the
    option merged into the context's last token, which lm-eval would score as log 1 = 0) is the
    option tokenized on its own instead.
    """
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, option = context[:-n_ws], context[-n_ws:] + option
    ctx = _encode(tokenizer, context)
    cont = _encode(tokenizer, context + option)[len(ctx):]
    if not cont:
        cont = list(tokenizer(option, add_special_tokens=False)["input_ids"])
    if not cont or not ctx:
        raise ValueError(f"cannot score option {option!r} after context {context[-40:]!r}")
    return ctx + cont, len(cont)


def loglik_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    options_per_prompt: Sequence[Sequence[str]],
    batch_size: int = 16,
    *,
    precision: str = "auto",
    progress: bool = False,
) -> list[list[float]]:
    """Summed log-probability of each option's tokens given its prompt.

    Each prompt runs once: its KV cache is copied to every option, which then costs only its own
    few tokens (multiple-choice prompts are long and options like "answer3" short, so this is
    ~options-times less compute). Models that return no cache are scored per (prompt, option).
    """
    if len(prompts) != len(options_per_prompt):
        raise ValueError("prompts and options_per_prompt differ in length")
    requests = [[_split_request(tokenizer, p, o) for o in opts] for p, opts in zip(prompts, options_per_prompt)]
    scores = [[0.0] * len(opts) for opts in options_per_prompt]
    order = sorted((i for i, reqs in enumerate(requests) if reqs), key=lambda i: -len(requests[i][0][0]))
    with _inference(model, precision), _progress(progress, "loglik") as bar:
        task_id = bar.add_task("ll", total=len(order), rate="") if bar else None
        for idx in _batches(order, max(1, batch_size // 2)):
            if not _score_shared_prefix(model, tokenizer, [requests[i] for i in idx], [scores[i] for i in idx]):
                return _loglik_per_option(model, tokenizer, requests, scores, batch_size)
            if bar is not None:
                bar.update(task_id, advance=len(idx))
    return scores


def _score_shared_prefix(
    model: torch.nn.Module, tokenizer: Any, batch: list[list[tuple[list[int], int]]], out: list[list[float]]
) -> bool:
    """Score one batch of prompts (each a list of (ids, option length)) into `out`; False if
    the model returns no cache to share."""
    device, pad_id = _device(model), _pad_id(model, tokenizer)
    contexts = [reqs[0][0][: len(reqs[0][0]) - reqs[0][1]] for reqs in batch]  # the same for every option
    ids, mask = _left_pad(contexts, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    first = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = _cache_of(first)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return False
    first_logp = first.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token
    rows = [(p, j) for p, reqs in enumerate(batch) for j in range(len(reqs))]
    options = [batch[p][j][0][len(contexts[p]):] for p, j in rows]
    width = max(len(o) for o in options)
    opt_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")  # moved below
    opt_mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for r, o in enumerate(options):
        opt_ids[r, : len(o)] = torch.tensor(o, device="cpu")
        opt_mask[r, : len(o)] = 1
    owner = torch.tensor([p for p, _ in rows], device=device)
    cache.batch_select_indices(owner)  # each option row gets a copy of its prompt's cache
    full_mask = torch.cat([mask[owner], opt_mask.to(device)], dim=1)
    opt_pos = pos[owner, -1:] + 1 + torch.arange(width, device=device)
    logits = model(input_ids=opt_ids.to(device), attention_mask=full_mask, position_ids=opt_pos, cache=cache, use_cache=True).logits
    logp = logits.float().log_softmax(-1)
    for r, ((p, j), o) in enumerate(zip(rows, options)):
        total = float(first_logp[p, o[0]])
        if len(o) > 1:
            total += float(logp[r, : len(o) - 1].gather(-1, opt_ids[r, 1 : len(o), None].to(device)).sum())
        out[p][j] = total
    return True


def _loglik_per_option(
    model: torch.nn.Module, tokenizer: Any, requests: list[list[tuple[list[int], int]]], scores: list[list[float]], batch_size: int
) -> list[list[float]]:
    """Every (prompt, option) as its own sequence: for models without a KV cache."""
    reqs: list[tuple[int, int, list[int], int]] = [
        (i, j, ids, n_opt) for i, per in enumerate(requests) for j, (ids, n_opt) in enumerate(per)
    ]
    order = sorted(range(len(reqs)), key=lambda r: -len(reqs[r][2]))
    device, pad_id = _device(model), _pad_id(model, tokenizer)
    for idx in _batches(order, batch_size):
        batch = [reqs[r] for r in idx]
        ids, mask = _left_pad([b[2] for b in batch], pad_id, device)
        # Left padding: positions must count real tokens only, as in unpadded inputs.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(b[3] for b in batch) + 1
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
        except TypeError:  # a wrapper without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logp = logits[:, -keep:].float().log_softmax(-1)
        width = ids.shape[1]
        for row, (i, j, _, n_opt) in enumerate(batch):
            target = ids[row, width - n_opt:]
            # logits at position p predict token p+1; logp[:, k] is position width-keep+k.
            lp = logp[row, keep - n_opt - 1: keep - 1]
            scores[i][j] = float(lp.gather(-1, target[:, None]).sum())
    return scores


def loglik_choices(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    options_per_prompt: Sequence[Sequence[str]],
    batch_size: int = 16,
    *,
    precision: str = "auto",
    progress: bool = False,
) -> list[int]:
    """Index of the most likely option for each prompt (first one on ties)."""
    scores = loglik_scores(model, tokenizer, prompts, options_per_prompt, batch_size,
                           precision=precision, progress=progress)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def choice_picks(scores: Sequence[Sequence[float]], options: Sequence[Sequence[str]]) -> tuple[list[int], list[int]]:
    """lm-eval's multiple-choice picks: (acc, acc_norm) argmaxes, the first option on ties.

    acc ranks the summed log-likelihoods; acc_norm ranks them divided by the option's length,
    which lm-eval 0.4.13 takes as `len(choice)`: the characters of the option text without the
    target delimiter (its docs say bytes; they are the same for ASCII; `acc_bytes` is the byte one).
    """
    acc, norm = [], []
    for row, opts in zip(scores, options, strict=True):
        acc.append(max(range(len(row)), key=row.__getitem__))
        normed = [s / float(len(o)) for s, o in zip(row, opts, strict=True)]
        norm.append(max(range(len(normed)), key=normed.__getitem__))
    return acc, norm


# --------------------------------------------------------------------------- evaluate

def task_template(task: Task, template: str | None = None) -> str:
    """The template to use: the caller's, else the task instance's, else the task default."""
    return template or getattr(task, "template", None) or task.default_template


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[EvalExample],
    *,
    template: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    mode: str = "generate",
    progress: bool = True,
    precision: str = "auto",
    details: bool = False,
    merge: bool = True,
) -> dict[str, Any]:
    """Accuracy of `model` on `examples`, with a Wilson 95% interval and throughput.

    mode="generate" grades greedy generations with `task.score` (merge=True folds each adapter's
    B R A into its weight for the duration: R is fixed at evaluation). mode="loglik" is
    lm-eval's multiple choice: each option (after `task.loglik_prefix` and the task's
    `target_delimiter`) is scored by log-likelihood, and `acc` and `acc_norm` (see
    `choice_picks`) are reported with their intervals; the task's `headline_metric` (default
    acc) is the headline `accuracy`, and its pick's text is graded by score() for the other
    keys. Every key score() returns becomes a metric (mean over the examples that report it).
    details=True adds each example's id, option scores and picks (loglik mode). Examples whose
    meta has a "bucket" (e.g. a difficulty) are also scored per bucket ("by_bucket"), so a
    ceiling or a floor in one part of the mix shows.
    """
    tpl = task_template(task, template)
    prompts = [render_prompt(ex.instruction, tpl, tokenizer) for ex in examples]
    start = time.perf_counter()
    headline = getattr(task, "headline_metric", "acc")
    scores: list[list[float]] = []
    picks: dict[str, list[int]] = {}
    if mode == "generate":
        gens = generate_with_stats(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens or task.max_new_tokens,
            stop_strings=task.stop_strings, stop_patterns=getattr(task, "stop_patterns", ()),
            batch_size=batch_size, progress=progress,
            precision=precision, merge=merge,
        )  # fmt: skip
        predictions, tokens = gens.texts, gens.tokens
    elif mode == "loglik":
        scores, picks = _loglik_picks(model, tokenizer, task, examples, prompts, batch_size, precision=precision, progress=progress)
        predictions, tokens = [ex.options[k] for ex, k in zip(examples, picks[headline])], 0
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: generate, loglik")
    wall = time.perf_counter() - start
    sums, counts, intervals = _tally(task, predictions, examples, picks, headline)
    correct, n = sums.get("correct", 0), len(examples)
    extra: dict[str, Any] = {}
    if mode == "loglik":
        extra = {"protocol": getattr(task, "protocol", None), "headline": headline, "intervals": intervals}
        if details:
            extra["examples"] = [
                {"id": ex.meta.get("id", i), "scores": row, "acc_pick": a, "acc_norm_pick": b, "gold_index": ex.gold_index}
                for i, (ex, row, a, b) in enumerate(zip(examples, scores, picks["acc"], picks["acc_norm"]))
            ]
    out_buckets = by_bucket(task, predictions, examples)
    return {
        "task": task.name,
        "mode": mode,
        "template": tpl,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": list(wilson_interval(correct, n)),
        "metrics": {k: sums[k] / counts[k] for k in sums},
        "metric_n": dict(counts),
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "examples_per_s": n / wall if wall > 0 else 0.0,
        "precision": precision,
        "precision_used": inference_precision(model, precision),  # as_is (the stored dtype), bf16, autocast
        **({"by_bucket": out_buckets} if out_buckets else {}),
        "predictions": list(predictions),
        **extra,
    }


def _loglik_picks(
    model: torch.nn.Module, tokenizer: Any, task: Task, examples: Sequence[EvalExample], prompts: list[str], batch_size: int, *, precision: str, progress: bool
) -> tuple[list[list[float]], dict[str, list[int]]]:
    """lm-eval's multiple choice: every option's log-likelihood, and the acc / acc_norm picks."""
    if any(not ex.options for ex in examples):
        raise ValueError(f"mode='loglik' needs options on every example; {task.name} has none")
    delim = getattr(task, "target_delimiter", "")
    scores = loglik_scores(
        model, tokenizer, [p + task.loglik_prefix for p in prompts],
        [[delim + o for o in ex.options] for ex in examples], batch_size,
        precision=precision, progress=progress,
    )  # fmt: skip
    return scores, dict(zip(("acc", "acc_norm"), choice_picks(scores, [ex.options for ex in examples])))


def _tally(
    task: Task, predictions: Sequence[str], examples: Sequence[EvalExample], picks: dict[str, list[int]], headline: str
) -> tuple[dict[str, int], dict[str, int], dict[str, list[float]]]:
    """(correct, graded and Wilson interval) per metric: every key `task.score` returns, and in
    loglik mode acc / acc_norm counted by option index (option texts may repeat); "correct" is
    the headline pick's."""
    sums: dict[str, int] = {}
    counts: dict[str, int] = {}
    for pred, ex in zip(predictions, examples):
        for key, ok in task.score(pred, ex).items():
            sums[key] = sums.get(key, 0) + int(bool(ok))
            counts[key] = counts.get(key, 0) + 1
    n = len(examples)
    intervals: dict[str, list[float]] = {}
    for key, chosen in picks.items():
        sums[key] = sum(int(k == ex.gold_index) for k, ex in zip(chosen, examples))
        counts[key] = n
        intervals[key] = list(wilson_interval(sums[key], n))
    if picks:
        sums["correct"], counts["correct"] = sums[headline], n
    return sums, counts, intervals


def by_bucket(task: Task, predictions: Sequence[str], examples: Sequence[EvalExample]) -> dict[str, Any]:
    """Accuracy with its Wilson interval per `meta["bucket"]`; empty when no example has one."""
    tally: dict[str, list[int]] = {}
    for pred, ex in zip(predictions, examples):
        bucket = ex.meta.get("bucket") if ex.meta else None
        if bucket is None:
            continue
        k_n = tally.setdefault(str(bucket), [0, 0])
        k_n[0] += int(bool(task.score(pred, ex).get("correct")))
        k_n[1] += 1
    return {
        b: {"n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n))}
        for b, (k, n) in sorted(tally.items())
    }
