"""Evaluation on a tiny random Llama: batching must not change what greedy decoding produces."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import pytest
import torch

from fedsb.evaluation import (
    _split_request,
    choice_picks,
    evaluate,
    generate,
    generate_with_stats,
    inference_precision,
    loglik_choices,
    loglik_scores,
    truncate_at_stop,
    wilson_interval,
)
from fedsb.tasks.base import EvalExample, Example, Task
from fixtures_tasks import smollm2_tokenizer, tiny_llama

PROMPTS = [
    "Hello there, how are",
    "The capital of France is a city called",
    "x",
    "What is 2+2? Answer:",
    "Once upon a time in a land far far away there lived a",
]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # One thread: the tiny model gains nothing from two, and on a shared, oversubscribed CPU
    # OpenMP barriers make two threads many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(len(tok))
    torch.set_num_threads(threads)


def _one_by_one(model, tok, prompts, **kw):
    return [generate(model, tok, [p], progress=False, precision="fp32", **kw)[0] for p in prompts]


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (5, 10, 0.2366, 0.7634),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 200, 0.1951, 0.3143),
    ],
)
def test_wilson_interval(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert math.isclose(a, lo, abs_tol=1e-4) and math.isclose(b, hi, abs_tol=1e-4)


def test_wilson_interval_empty_and_z():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(5, 10, z=2.576)[0] < wilson_interval(5, 10)[0]


def test_truncate_at_stop():
    assert truncate_at_stop("a ### b\n\nc", ["\n\n", "###"]) == "a "
    assert truncate_at_stop("abc", ["zz", ""]) == "abc"
    # a pattern match is kept; whichever cut comes first wins
    text = "so #### 27\n#### 27\n#### 27"
    assert truncate_at_stop(text, [], [r"####[^\n]*\d[^\n]*\n"]) == "so #### 27\n"
    assert truncate_at_stop(text, ["so"], [r"####[^\n]*\n"]) == ""
    assert truncate_at_stop(text, [], [r"nomatch"]) == text


def test_inference_precision(model):
    assert inference_precision(model, "fp32") == "as_is"
    assert inference_precision(model, "bf16") == "bf16"
    assert inference_precision(model, "autocast") == "autocast"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert inference_precision(model, "auto") == ("bf16" if native else "as_is")
    with pytest.raises(ValueError, match="unknown precision"):
        inference_precision(model, "fp16x")


# --------------------------------------------------------------------------- generation


def test_batched_generation_matches_one_by_one_in_input_order(model, tok):
    expected = _one_by_one(model, tok, PROMPTS, max_new_tokens=10)
    assert len(set(expected)) == len(PROMPTS)  # distinct, so an order mix-up would show
    got = generate(
        model, tok, PROMPTS, max_new_tokens=10, batch_size=3, progress=False, precision="fp32"
    )
    assert got == expected
    # duplicates and a batch size larger than the input
    dup = [PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    got = generate(
        model, tok, dup, max_new_tokens=10, batch_size=8, progress=False, precision="fp32"
    )
    assert got == [expected[2], expected[0], expected[2]]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_stop_string_truncates_and_stops_early(model, tok, engine):
    prompt = PROMPTS[1]
    kw = dict(max_new_tokens=12, progress=False, precision="fp32", engine=engine)
    full = generate_with_stats(model, tok, [prompt], **kw)
    ids = tok(prompt)["input_ids"]
    out = model.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )[0, len(ids) :].tolist()
    assert full.texts[0] == tok.decode(out, skip_special_tokens=True)  # plain HF greedy
    # a stop string equal to a mid-sequence token's text (alphanumeric, so it decodes exactly)
    k, stop = next(
        (k, tok.decode([t]))
        for k, t in enumerate(out)
        if 2 <= k and tok.decode([t]).strip().isalnum()
    )
    cut = full.texts[0].index(stop)
    got = generate_with_stats(model, tok, [prompt], stop_strings=[stop], **kw)
    assert got.texts[0] == full.texts[0][:cut]
    assert got.tokens <= k + 1 < full.tokens


def test_fast_engine_matches_model_generate_on_a_batch(model, tok):
    """Rows leave the batch at different steps (stop strings); the rest must not change."""
    plain = generate(model, tok, PROMPTS, max_new_tokens=10, progress=False, precision="fp32")
    # stop on a piece of each of three generations, so rows finish at different steps
    stops = [plain[i][len(plain[i]) // 3 :][:3] for i in (0, 2, 4)]
    stops = [s for s in stops if s.strip()]
    kw = dict(max_new_tokens=10, stop_strings=stops, batch_size=5, precision="fp32")
    fast = generate_with_stats(model, tok, PROMPTS, progress=False, engine="fast", **kw)
    ref = generate_with_stats(model, tok, PROMPTS, progress=False, engine="hf", **kw)
    assert fast.texts == ref.texts
    assert sum(a != b for a, b in zip(fast.texts, plain)) >= 2  # some rows really stopped
    assert fast.tokens < 10 * len(PROMPTS)
    with pytest.raises(ValueError, match="unknown engine"):
        generate(model, tok, PROMPTS, max_new_tokens=1, engine="beam", progress=False)


def test_stop_pattern_keeps_the_match_and_stops_early(model, tok):
    plain = generate_with_stats(
        model, tok, PROMPTS, max_new_tokens=10, progress=False, precision="fp32"
    )
    # a regex matching a chunk from the middle of two generations
    chunks = [plain.texts[i][len(plain.texts[i]) // 3 :][:4] for i in (1, 3)]
    pattern = "|".join(re.escape(c) for c in chunks if c.strip())
    kw = dict(max_new_tokens=10, stop_patterns=[pattern], batch_size=5, precision="fp32")
    fast = generate_with_stats(model, tok, PROMPTS, progress=False, engine="fast", **kw)
    ref = generate_with_stats(model, tok, PROMPTS, progress=False, engine="hf", **kw)
    assert fast.texts == ref.texts
    for got, full in zip(fast.texts, plain.texts):
        m = re.search(pattern, full)
        assert got == (full[: m.end()] if m else full)
    assert fast.tokens < plain.tokens


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_low_precision_runs_and_restores_the_model(model, tok, precision):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=True, precision=precision)
    scores = loglik_scores(model, tok, PROMPTS[:1], [[" a", " b"]], precision=precision)
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
    assert all(math.isfinite(x) for x in scores[0])
    assert model.training
    model.eval()
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- log-likelihood


def _reference_scores(model, tok, prompt, options):
    """Unbatched, unpadded: tokenize prompt+option, sum log-probs of the option's tokens."""
    out = []
    for opt in options:
        ctx = tok(prompt)["input_ids"]
        whole = tok(prompt + opt)["input_ids"]
        assert whole[: len(ctx)] == ctx
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        out.append(sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
    return out


def test_loglik_scores_match_unbatched_reference(model, tok):
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[3]]
    options = [
        [" Paris", " London town", " a"],
        [" wizard", " b c d e"],
        [" 4", " four", " 5 apples"],
    ]
    got = loglik_scores(model, tok, prompts, options, batch_size=3, precision="fp32")
    for p, opts, row in zip(prompts, options, got):
        ref = _reference_scores(model, tok, p, opts)
        assert row == pytest.approx(ref, abs=1e-3)
    assert loglik_choices(model, tok, prompts, options, 2, precision="fp32") == [
        max(range(len(r)), key=r.__getitem__) for r in got
    ]


def _greedy_token_options(model, tok, prompt):
    """Three one-token options for `prompt`: the model's argmax first, two unlikely ones."""
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    ranked = logits.argsort(descending=True).tolist()
    good = [t for t in ranked[:50] if tok(prompt + tok.decode([t]))["input_ids"] == ids + [t]]
    bad = [t for t in ranked[-200:] if tok(prompt + tok.decode([t]))["input_ids"] == ids + [t]]
    return [tok.decode([good[0]]), tok.decode([bad[0]]), tok.decode([bad[1]])]


def test_loglik_picks_the_models_argmax_option(model, tok):
    prompts = [PROMPTS[0], PROMPTS[3]]
    a, b = (_greedy_token_options(model, tok, p) for p in prompts)
    shuffled = [[a[1], a[0], a[2]], [b[2], b[1], b[0]]]
    assert loglik_choices(model, tok, prompts, shuffled, precision="fp32") == [1, 2]
    with pytest.raises(ValueError, match="differ in length"):
        loglik_choices(model, tok, prompts, shuffled[:1])


# --------------------------------------------------------------------------- evaluate


class EchoTask(Task):
    """Correct when the generation equals `gold`; a side metric on some examples only."""

    name = "echo"
    default_template: ClassVar[str] = "plain"
    max_new_tokens: ClassVar[int] = 6

    def train_examples(self, limit=None, seed=0) -> list[Example]:
        return []

    def eval_examples(self, limit=None, seed=0) -> list[EvalExample]:
        return []

    def score(self, generation, example):
        out = {"correct": generation == example.gold}
        if example.meta.get("side"):
            out["side"] = True
        return out


def test_evaluate_generate(model, tok):
    expected = _one_by_one(model, tok, [p + "\n" for p in PROMPTS], max_new_tokens=6)
    examples = [
        EvalExample(p, g if i % 2 == 0 else "wrong", meta={"side": i < 2})
        for i, (p, g) in enumerate(zip(PROMPTS, expected))
    ]
    res = evaluate(model, tok, EchoTask(), examples, batch_size=2, progress=False, precision="fp32")
    assert res["predictions"] == expected
    assert (res["n"], res["correct"]) == (5, 3) and res["accuracy"] == pytest.approx(0.6)
    assert res["metrics"] == {"correct": pytest.approx(0.6), "side": 1.0}
    assert res["metric_n"] == {"correct": 5, "side": 2}
    assert res["ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    assert 0 < res["generated_tokens"] <= 30 and res["tokens_per_s"] > 0 and res["wall_s"] > 0
    assert res["template"] == "plain" and res["mode"] == "generate"


class ChoiceTask(EchoTask):
    loglik_prefix: ClassVar[str] = "Answer:"


def test_evaluate_loglik(model, tok):
    prompts = [PROMPTS[0], PROMPTS[3]]
    examples = []
    for p in prompts:
        best, *rest = _greedy_token_options(model, tok, p + "\n" + ChoiceTask.loglik_prefix)
        examples.append(EvalExample(p, best, options=(rest[0], best, rest[1]), gold_index=1))
    examples.append(
        EvalExample(prompts[0], examples[0].options[0], options=examples[0].options, gold_index=0)
    )
    res = evaluate(
        model, tok, ChoiceTask(), examples, mode="loglik", progress=False, precision="fp32"
    )
    assert res["predictions"] == [examples[0].gold, examples[1].gold, examples[0].gold]
    assert res["correct"] == 2 and res["generated_tokens"] == 0
    with pytest.raises(ValueError, match="needs options"):
        evaluate(model, tok, ChoiceTask(), [EvalExample("q", "a")], mode="loglik", progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate(model, tok, ChoiceTask(), examples, mode="beam", progress=False)


def test_evaluate_empty(model, tok):
    res = evaluate(model, tok, EchoTask(), [], progress=False)
    assert res["n"] == 0 and res["accuracy"] == 0.0 and res["ci95"] == [0.0, 1.0]


class _NoCache(torch.nn.Module):
    """The same model, but its outputs carry no KV cache (as some wrappers do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, **kw):
        out = self.inner(**kw)
        out.cache = None
        out.past_key_values = None
        return out


def test_loglik_without_a_cache_scores_each_option_alone(model, tok):
    prompts = [PROMPTS[1], PROMPTS[4]]
    options = [[" Paris", " London town", " a"], [" wizard", " b c d e"]]
    shared = loglik_scores(model, tok, prompts, options, batch_size=4, precision="fp32")
    alone = loglik_scores(_NoCache(model), tok, prompts, options, batch_size=4, precision="fp32")
    for a, b in zip(shared, alone):
        assert a == pytest.approx(b, abs=1e-4)


# --------------------------------------------------------------------------- lm-eval conventions


def test_choice_picks_acc_and_length_normalized():
    scores = [[-4.0, -6.0], [-3.0, -3.0], [-10.0, -9.0, -30.0]]
    options = [["ab", "abcdef"], ["x", "y"], ["a", "bcdefghij", "k" * 40]]
    # row 0: acc picks the shorter; per character -2 vs -1 picks the longer; ties: the first
    assert choice_picks(scores, options) == ([0, 0, 1], [1, 0, 2])


def test_split_request_is_lm_evals_encode_pair(tok):
    """lm-eval: trailing spaces move to the continuation; continuation = whole[len(context):]."""
    for ctx, cont in [("Question: why?\nAnswer:", " because it rains"), ("the correct answer is ", "answer3"),
                      ("Hello wor", "ld peace"), ("x", " y")]:
        n = len(ctx) - len(ctx.rstrip())
        c, o = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        c_ids, whole = tok(c)["input_ids"], tok(c + o)["input_ids"]
        expected = c_ids + whole[len(c_ids):]
        assert _split_request(tok, ctx, cont) == (expected, len(whole) - len(c_ids))


class TextChoiceTask(ChoiceTask):
    loglik_prefix: ClassVar[str] = ""
    target_delimiter: ClassVar[str] = " "
    headline_metric: ClassVar[str] = "acc_norm"
    protocol: ClassVar[str] = "text"


def test_evaluate_loglik_reports_acc_and_acc_norm(model, tok):
    examples = [
        EvalExample("Question: a?\nAnswer:", "no", options=("yes", "no", "maybe so"), gold_index=1, meta={"id": "t:0"}),
        EvalExample("Question: b?\nAnswer:", "red", options=("red", "blue sky"), gold_index=0, meta={"id": "t:1"}),
    ]
    res = evaluate(model, tok, TextChoiceTask(), examples, mode="loglik", progress=False, precision="fp32", details=True)
    prompts = [ex.instruction + "\n" for ex in examples]  # EchoTask's "plain" template
    scores = loglik_scores(model, tok, prompts, [[" " + o for o in ex.options] for ex in examples], precision="fp32")
    acc, norm = choice_picks(scores, [ex.options for ex in examples])
    assert [e["scores"] for e in res["examples"]] == scores
    assert [e["acc_pick"] for e in res["examples"]] == acc and [e["acc_norm_pick"] for e in res["examples"]] == norm
    hits = {"acc": sum(k == ex.gold_index for k, ex in zip(acc, examples)),
            "acc_norm": sum(k == ex.gold_index for k, ex in zip(norm, examples))}
    assert res["metrics"]["acc"] == hits["acc"] / 2 and res["metrics"]["acc_norm"] == hits["acc_norm"] / 2
    assert res["correct"] == hits["acc_norm"] and res["headline"] == "acc_norm" and res["protocol"] == "text"
    assert res["intervals"]["acc"] == pytest.approx(list(wilson_interval(hits["acc"], 2)))
    assert res["precision"] == "fp32" and res["precision_used"] == "as_is"
    assert [e["id"] for e in res["examples"]] == ["t:0", "t:1"]
