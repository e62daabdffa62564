"""A user's own supervised fine-tuning data, in TRL's SFT formats (task "sft").

One JSON object per line (`.jsonl`) or one JSON list (`.json`), each record one of:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}

plus an optional "answer" string, the gold answer of the answer check (default: the final
completion). Conversations are rendered with the tokenizer's chat template; a string prompt with
`task.template` ("raw" by default: prompt and completion concatenated, as TRL does). The loss
falls on the assistant turns (the completion) only, up to and including the end-of-turn token;
where the template puts none there, the tokenizer's EOS is appended to the final turn and
carries loss (the pad token is often EOS: it is never masked by id).

Evaluation (`fedsb.scoring.heldout_evaluation`, chosen by `heldout_loss = True`): held-out loss
and perplexity on the same tokens the loss trains, an optional answer check (exact match after
normalization, or a regex that extracts the answer) with a Wilson interval, and a few
generations kept for a person to read ("samples").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedsb.config_types import ConfigError
from fedsb.errors import FedsbError
from fedsb.rundir import atomic_write_bytes
from fedsb.tasks.base import Task, check_options, register_task
from fedsb.tasks.io import check_record, iter_records, seeded_subset
from fedsb.tasks.prompts import render_prompt

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
ANSWER_CHECKS: tuple[str, ...] = ("none", "exact", "regex")
IGNORE_INDEX = -100  # fedsb.data's (not imported here: fedsb.data imports fedsb.tasks)


class TemplateError(FedsbError, ValueError):
    """A chat template that cannot render or split a record; the message names the record."""


@dataclass(frozen=True)
class SftExample:
    """One record. `messages` is set for conversations (and conversational prompt/completion),
    `prompt`/`completion` for plain text; `trained[i]` says whether message i carries loss."""

    messages: tuple[tuple[str, str], ...] = ()
    trained: tuple[bool, ...] = ()
    prompt: str | None = None
    completion: str | None = None
    answer: str | None = None  # the record's gold answer for the answer check, if it gives one
    key: str | None = None
    where: str = field(default="", compare=False)  # "file:line", for errors raised after loading

    @property
    def conversational(self) -> bool:
        return bool(self.messages)

    @property
    def reference(self) -> str:
        """The final completion: what the model should generate after `prompt_text`."""
        if self.conversational:
            return self.messages[-1][1]
        return self.completion or ""

    @property
    def gold(self) -> str:
        return self.answer if self.answer is not None else self.reference

    def segments(self, tokenizer: Any, template: str) -> list[tuple[str, bool]]:
        """(text, carries loss) pieces whose concatenation is the rendered example."""
        if not self.conversational:
            return [(render_prompt(self.prompt or "", template, tokenizer), False), (self.completion or "", True)]
        return chat_segments(self.messages, self.trained, tokenizer, self.where)

    def prompt_text(self, tokenizer: Any, template: str) -> str:
        """What a model sees before generating the final completion."""
        if not self.conversational:
            return render_prompt(self.prompt or "", template, tokenizer)
        last = len(self.messages) - 1
        return _render(tokenizer, self.messages[:last], self.where, generation_prompt=True)

    def tokenize(self, tokenizer: Any, template: str, max_length: int) -> Any:
        """A `fedsb.data.Tokenized` with labels on the trained pieces only."""
        from fedsb.data import Tokenized  # imports torch (fedsb.data)

        ids, labels = token_labels(self.segments(tokenizer, template), tokenizer)
        if len(ids) > max_length:  # keep the end: the final answer and its EOS are what trains
            ids, labels = ids[-max_length:], labels[-max_length:]
        return Tokenized(ids, labels, self.key)


# --- rendering and the loss mask ------------------------------------------------------------


def _render(tokenizer: Any, messages: tuple[tuple[str, str], ...], where: str, *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"{where}: a conversational record needs a tokenizer with a chat template; "
            f"{type(tokenizer).__name__} has none (use prompt/completion records with strings)"
        )
    msgs = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(messages: tuple[tuple[str, str], ...], trained: tuple[bool, ...], tokenizer: Any, where: str = "") -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, carries loss) pieces.

    Each trained turn i is the text between the rendering of messages[:i] with the generation
    prompt and the rendering of messages[:i+1]; the loss covers it up to and including the
    tokenizer's EOS (the end-of-turn token of ChatML templates such as SmolLM2's), and what the
    template adds after that (a newline) carries none. A template whose renderings are not
    prefixes of each other cannot be split this way and is refused.
    """
    eos = getattr(tokenizer, "eos_token", None)
    out: list[tuple[str, bool]] = []
    done = ""
    for i, is_trained in enumerate(trained):
        if not is_trained:
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], where, generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError(
                f"{where}: the tokenizer's chat template does not render a conversation as a prefix of "
                f"its continuation, so the assistant turns cannot be masked (use prompt/completion records)"
            )
        out.append((before[len(done) :], False))
        turn = after[len(before) :]
        cut = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn)
        out += [(turn[:cut], True), (turn[cut:], False)]
        done = after
    full = _render(tokenizer, messages, where, generation_prompt=False)
    out.append((full[len(done) :], False))
    return [(text, t) for text, t in out if text]


def _ids(tokenizer: Any, text: str, first: bool) -> list[int]:
    """Token ids of one piece; only the first gets the tokenizer's own specials (a BOS), and not
    when the text already starts with it (a rendered chat template): as evaluation encodes prompts."""
    if not first:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def token_labels(segments: list[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input ids, labels): each piece tokenized on its own, labels = ids on the trained pieces
    and IGNORE_INDEX elsewhere. If no trained piece ends in EOS, the EOS is appended to the last
    one with its label, so the model learns to stop (never masked by id: the pad may be EOS)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = _ids(tokenizer, text, first=not ids)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    eos_id = tokenizer.eos_token_id
    last = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=None)
    if eos_id is not None and (last is None or ids[last] != eos_id):
        at = len(ids) if last is None else last + 1
        ids.insert(at, eos_id)
        labels.insert(at, eos_id)
    return ids, labels


# --- reading records ------------------------------------------------------------------------


def _messages(value: Any, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} should be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(value):
        here = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{here} should be an object with 'role' and 'content', got {type(m).__name__}")
        for k in ("role", "content"):
            if k not in m:
                raise ValueError(f"{here}: missing key {k!r}")
            if not isinstance(m[k], str):
                raise ValueError(f"{here}.{k} should be a string, got {type(m[k]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"{here}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        out.append((m["role"], m["content"]))
    return out


def parse_record(rec: dict[str, Any], where: str = "") -> SftExample:
    """A record in one of TRL's SFT formats -> SftExample; a ValueError says what is wrong."""
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' should be a string, got {type(answer).__name__}")
    if "messages" in rec:
        msgs = _messages(rec["messages"], "messages")
        trained = tuple(r == "assistant" for r, _ in msgs)
        if not any(trained):
            raise ValueError("no assistant message: the loss is on assistant turns, so there is nothing to learn")
        if msgs[-1][0] != "assistant":
            raise ValueError(f"the last message should be the assistant's, got role {msgs[-1][0]!r}")
        if trained[0]:
            raise ValueError("the conversation starts with an assistant message; expected a user (or system) message first")
        for i, (r, c) in enumerate(msgs):
            if r == "assistant" and not c.strip():
                raise ValueError(f"messages[{i}]: empty assistant content")
        return SftExample(messages=tuple(msgs), trained=trained, answer=answer, where=where)
    if "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if k not in rec:
                raise ValueError(f"missing key {k!r} (a prompt/completion record needs both)")
        prompt, completion = rec["prompt"], rec["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip():
                raise ValueError("empty prompt")
            if not completion.strip():
                raise ValueError("empty completion")
            return SftExample(prompt=prompt, completion=completion, answer=answer, where=where)
        if isinstance(prompt, list) and isinstance(completion, list):
            p, c = _messages(prompt, "prompt"), _messages(completion, "completion")
            if any(r == "assistant" for r, _ in p[-1:]):
                raise ValueError("the prompt ends with an assistant message; expected a user (or system) message last")
            if any(not text.strip() for _, text in c):
                raise ValueError("empty completion")
            if c[-1][0] != "assistant":
                raise ValueError(f"the completion's last message should be the assistant's, got role {c[-1][0]!r}")
            return SftExample(messages=tuple(p + c), trained=(False,) * len(p) + (True,) * len(c), answer=answer, where=where)
        raise ValueError(
            f"'prompt' and 'completion' should both be strings or both lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    raise ValueError(
        f"expected a 'messages' list or 'prompt' and 'completion' keys (TRL's SFT formats); "
        f"got keys: {', '.join(sorted(rec)) or 'none'}"
    )


def read_sft_file(path: str | Path) -> list[SftExample]:
    """Every record of a json/jsonl file; a bad one is a one-line error with file and line."""
    out = []
    for line, rec in iter_records(path):
        where = f"{path}:{line}"
        out.append(check_record(rec, (), lambda r: parse_record(r, where), path, line))
    return out


# --- the answer check -----------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace and punctuation, inner runs of whitespace, and thousands
    separators in numbers do not count."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.strip().lower())
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,;:!?\"'`")


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer in `text`: its last match of `pattern` (group 1 if the pattern has one), or the
    whole text without a pattern; None when the pattern does not match."""
    if not pattern:
        return text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return m.group(1) if m.re.groups else m.group(0)


@dataclass(frozen=True)
class SftOptions:
    """Options of task "sft" (`task.options`)."""

    path: str | None = None  # training file (.jsonl or .json); refused with federation.client_data
    eval_path: str | None = None  # held-out file; refused with federation.client_data
    answer_check: str = "none"  # "none", "exact" (after normalization) or "regex"
    answer_regex: str | None = None  # answer_check = "regex": the answer is its last match (group 1 if any)
    num_samples: int = 3  # generations kept per evaluation for a person to read
    max_new_tokens: int = 128  # generation budget (task.max_new_tokens overrides it)


@register_task("sft")
class SftTask(Task):
    """The user's own records (see the module docstring); `read_file` is the per-party loader's."""

    output_type: ClassVar[str] = "generate_until"
    Options: ClassVar[type] = SftOptions
    default_template: ClassVar[str] = "raw"
    metric_names: ClassVar[tuple[str, ...]] = ("correct",)
    heldout_loss: ClassVar[bool] = True  # evaluated by held-out loss and perplexity besides its answer check (fedsb.scoring)

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str) -> dict[str, Any]:
        out = check_options(cls.Options, options, key, f"task {cls.name!r}")
        check = out.get("answer_check", "none")
        if check not in ANSWER_CHECKS:
            raise ConfigError(f"{key}.answer_check = {check!r}: allowed values are {', '.join(map(repr, ANSWER_CHECKS))}")
        regex = out.get("answer_regex")
        if (check == "regex") != bool(regex):
            raise ConfigError(f"{key}.answer_regex: give it exactly when answer_check = 'regex'")
        if regex:
            try:
                re.compile(regex)
            except re.error as e:
                raise ConfigError(f"{key}.answer_regex = {regex!r}: not a regular expression ({e})") from None
        if out.get("num_samples", 0) < 0 or out.get("max_new_tokens", 1) < 1:
            raise ConfigError(f"{key}: num_samples must be >= 0 and max_new_tokens >= 1")
        return out

    def __init__(
        self,
        path: str | None = None,
        eval_path: str | None = None,
        answer_check: str = "none",
        answer_regex: str | None = None,
        num_samples: int = 3,
        max_new_tokens: int = 128,
    ) -> None:
        given = dict(path=path, eval_path=eval_path, answer_check=answer_check, answer_regex=answer_regex, num_samples=num_samples, max_new_tokens=max_new_tokens)
        self.options = SftOptions(**self.check_options(given, "task.options"))
        self.max_new_tokens = max_new_tokens  # type: ignore[misc]

    # --- data

    def read_file(self, path: str | Path) -> list[SftExample]:
        return read_sft_file(path)

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[SftExample]:
        if self.options.path is None:
                raise ConfigError("task 'sft' needs task.options.path (a .jsonl/.json file) or federation.client_data")
        return seeded_subset(read_sft_file(self.options.path), limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[SftExample]:
        if self.options.eval_path is None:
            return []
        return seeded_subset(read_sft_file(self.options.eval_path), limit, seed)

    # --- grading

    def score(self, generation: str, example: Any) -> dict[str, bool]:
        o = self.options
        if o.answer_check == "none":
            return {}
        pattern = o.answer_regex if o.answer_check == "regex" else None
        got = extract_answer(generation, pattern)
        gold = extract_answer(example.gold, pattern)
        gold = example.gold if gold is None else gold  # a plain answer ("42") under an extracting regex
        return {"correct": got is not None and normalize_answer(got) == normalize_answer(gold)}

    def evaluate_model(self, model: Any, tokenizer: Any, examples: list[SftExample], **settings: Any) -> dict[str, Any]:
        """Kept for callers of the old API: the evaluator does the work (`fedsb.scoring.heldout_evaluation`,
        chosen by `heldout_loss`)."""
        from fedsb.scoring import heldout_evaluation  # slow dependency (torch): only when a model is scored

        return heldout_evaluation(model, tokenizer, self, examples, **settings)


# --- generations for a person to read -------------------------------------------------------

SAMPLES_FILE = "samples.md"


def _samples_by_party(ev: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    if not ev:
        return {}
    if "per_party" in ev:
        return {name: r.get("samples", []) for name, r in ev["per_party"].items() if r.get("samples")}
    return {"": ev["samples"]} if ev.get("samples") else {}


def samples_markdown(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str | None:
    """The final evaluation's kept generations, each beside the base model's for the same prompt;
    None when the evaluation kept none (tasks other than "sft")."""
    final = _samples_by_party(after)
    if not final:
        return None
    base = {(party, s["prompt"]): s["generation"] for party, rows in _samples_by_party(before).items() for s in rows}
    lines = ["# Generations after fine-tuning (greedy), beside the base model's", ""]
    for party, rows in final.items():
        if party:
            lines += [f"## {party}", ""]
        for i, s in enumerate(rows, 1):
            mark = "" if "correct" not in s else (" (correct)" if s["correct"] else " (wrong)")
            lines += [f"### {i}{mark}", "", "prompt:", "```", s["prompt"], "```", "reference:", "```", s["reference"], "```"]
            if (party, s["prompt"]) in base:
                lines += ["base model:", "```", base[(party, s["prompt"])], "```"]
            lines += ["fine-tuned:", "```", s["generation"], "```", ""]
    return "\n".join(lines)


def write_samples(out_dir: str | Path, before: dict[str, Any] | None, after: dict[str, Any] | None) -> Path | None:
    """`samples.md` in the results folder when the evaluation kept generations."""
    text = samples_markdown(before, after)
    if text is None:
        return None

    path = Path(out_dir) / SAMPLES_FILE
    atomic_write_bytes(path, text.encode())
    return path
