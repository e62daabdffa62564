"""SNLI: the jsonl loader on fixtures (labels, "-" rows, malformed lines), the seeded split,
the hub record format, and the classifier evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from fedsb.tasks import get_task
from fedsb.tasks.io import DataFormatError
from fedsb.tasks.nli import DEFAULT_REL, LABELS, SNLITask, _from_hub, read_snli

ROWS = [
    {"sentence1": "A man plays a guitar .", "sentence2": "A man plays music .", "gold_label": "entailment"},
    {"sentence1": "A man plays a guitar .", "sentence2": "A man is asleep .", "gold_label": "contradiction"},
    {"sentence1": "A man plays a guitar .", "sentence2": "A man plays for money .", "gold_label": "neutral"},
    {"sentence1": "Two dogs run .", "sentence2": "Animals move .", "gold_label": "-"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fixture(tmp_path, n=40):
    rows = [dict(ROWS[i % 4], sentence2=f"{ROWS[i % 4]['sentence2']} {i}") for i in range(n)]
    return write_jsonl(tmp_path / "snli.jsonl", rows)


def test_labels_and_unlabeled_rows(tmp_path):
    examples = read_snli(write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert [e.label for e in examples] == [0, 2, 1]  # "-" dropped
    assert [e.key for e in examples] == ["0", "2", "1"]
    assert examples[0].text_a == "A man plays a guitar ." and examples[0].text_b == "A man plays music ."
    assert LABELS == ("entailment", "neutral", "contradiction")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"sentence1": "a", "sentence2": "b", "gold_label": "maybe"}', "gold_label 'maybe'"),
        ('{"sentence1": "a", "gold_label": "neutral"}', "missing key 'sentence2'"),
        ('{"sentence1": "a", "sentence2": "b", "gold_label": ', "invalid JSON"),
        ('["a", "b", "neutral"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], bad])
    with pytest.raises(DataFormatError) as e:
        read_snli(path)
    assert e.value.line == 3 and str(path) in str(e.value) and message in str(e.value)


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    task = SNLITask(path=str(fixture(tmp_path, 40)), eval_fraction=0.2, public_fraction=0.1)
    parts = task.parts()
    assert {k: len(v) for k, v in parts.items()} == {"eval": 6, "public": 3, "train": 21}  # 30 labeled rows
    texts = {k: {e.text_b for e in v} for k, v in parts.items()}
    assert not (texts["train"] & texts["eval"]) and not (texts["train"] & texts["public"]) and not (texts["eval"] & texts["public"])
    again = SNLITask(path=str(fixture(tmp_path, 40)), eval_fraction=0.2, public_fraction=0.1).parts()
    assert again == parts
    other = SNLITask(path=str(fixture(tmp_path, 40)), eval_fraction=0.2, public_fraction=0.1, split_seed=1).parts()
    assert other["eval"] != parts["eval"]


def test_limits_are_seeded_subsets(tmp_path):
    task = SNLITask(path=str(fixture(tmp_path, 80)))
    a, b = task.train_examples(limit=10, seed=3), task.train_examples(limit=10, seed=3)
    assert a == b and len(a) == 10 and task.train_examples(limit=10, seed=4) != a
    assert len(task.eval_examples(limit=5)) == 5


def test_registered_names_and_public_part(tmp_path):
    path = str(fixture(tmp_path, 40))
    public = get_task("snli-public", path=path, public_fraction=0.1).train_examples()
    train = get_task("snli", path=path, public_fraction=0.1).train_examples()
    assert len(public) == 3 and not ({e.text_b for e in public} & {e.text_b for e in train})


def test_separate_train_and_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS * 5)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    task = SNLITask(train_path=str(train), eval_path=str(test), public_fraction=0.2)
    assert len(task.eval_examples()) == 2 and len(task.train_examples()) + len(task.parts()["public"]) == 15
    with pytest.raises(ValueError, match="go together"):
        SNLITask(train_path=str(train))


def test_bad_options_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="eval_fraction"):
        SNLITask(eval_fraction=0.0)
    with pytest.raises(FileNotFoundError):
        SNLITask(path=str(tmp_path / "nope.jsonl")).parts()


def test_missing_everywhere_says_how_to_provide_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(FileNotFoundError, match="stanfordnlp/snli"):
        SNLITask(data_root=str(tmp_path)).parts()


def test_hub_record_format():
    assert _from_hub({"premise": "p", "hypothesis": "h", "label": 2}).label == 2
    assert _from_hub({"premise": "p", "hypothesis": "h", "label": -1}) is None
    with pytest.raises(ValueError, match="label 7"):
        _from_hub({"premise": "p", "hypothesis": "h", "label": 7})


def test_score_for_generated_labels():
    from fedsb.tasks.base import EvalExample

    task = SNLITask()
    ex = EvalExample("premise / hypothesis", "neutral")
    assert task.score("Neutral.", ex)["correct"] and not task.score("entailment", ex)["correct"]


class _Constant(torch.nn.Module):
    """A 'classifier' that predicts class `k` for every input (to check the accounting)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], 3)
        logits[:, self.k] = 1.0
        return type("Out", (), {"logits": logits + self.w})()


def test_evaluate_model_accuracy_and_interval(tmp_path, char_tok):
    task = SNLITask(path=str(fixture(tmp_path, 40)))
    examples = task.eval_examples()
    expected = sum(e.label == 1 for e in examples)
    model = _Constant(1)
    model.train()
    out = task.evaluate_model(model, char_tok, examples, batch_size=4, precision="fp32")
    assert out["n"] == len(examples) and out["correct"] == expected
    assert out["accuracy"] == pytest.approx(expected / len(examples))
    lo, hi = out["ci95"]
    assert lo <= out["accuracy"] <= hi and out["wall_s"] >= 0
    assert model.training  # training mode restored


def test_evaluate_model_on_tiny_bert(tmp_path, char_tok):
    from fedsb.models import tiny_classifier

    task = SNLITask(path=str(fixture(tmp_path, 40)), max_length=48)
    model = tiny_classifier(vocab_size=len(char_tok))
    out = task.evaluate_model(model, char_tok, task.eval_examples(), batch_size=3, precision="fp32")
    assert out["n"] == 6 and 0 <= out["correct"] <= 6


def test_shared_snli_dev_file_when_present():
    from fedsb.tasks.io import default_data_root

    root = default_data_root()
    if root is None or not (root / DEFAULT_REL).is_file():
        pytest.skip("the shared SNLI dev file is not available")
    parts = SNLITask().parts()
    assert sum(len(v) for v in parts.values()) == 9842
    assert len(parts["eval"]) == int(9842 * 0.2)


def test_tune_evaluates_on_a_validation_slice_of_train(tmp_path):
    path = str(fixture(tmp_path, 80))
    plain = SNLITask(path=path, eval_fraction=0.2, public_fraction=0.1).parts()
    tuned = SNLITask(path=path, eval_fraction=0.2, public_fraction=0.1, tune=True, validation_fraction=0.25).parts()
    text = {k: {e.text_b for e in v} for k, v in tuned.items()}
    assert len(tuned["eval"]) == len(plain["train"]) // 4 and len(tuned["train"]) == len(plain["train"]) - len(tuned["eval"])
    assert text["eval"] <= {e.text_b for e in plain["train"]}  # validation comes out of train ...
    assert not (text["eval"] & text["train"]) and not (text["eval"] & {e.text_b for e in plain["eval"]})  # ... never eval
    assert tuned["public"] == plain["public"]
    with pytest.raises(ValueError, match="validation_fraction"):
        SNLITask(path=path, validation_fraction=0.0)


def test_shared_snli_dev_file_split_of_the_dp_config():
    """configs/snli-dp-small.toml: eval >= 1,000 pairs, about 8,000 for training."""
    from fedsb.tasks.io import default_data_root

    root = default_data_root()
    if root is None or not (root / DEFAULT_REL).is_file():
        pytest.skip("the shared SNLI dev file is not available")
    sizes = {k: len(v) for k, v in SNLITask(eval_fraction=0.12).parts().items()}
    assert sizes == {"public": 492, "eval": 1181, "train": 8169}


def test_public_part_does_not_depend_on_eval_fraction(tmp_path):
    path = str(fixture(tmp_path, 80))
    a = SNLITask(path=path, eval_fraction=0.2, public_fraction=0.1).parts()
    b = SNLITask(path=path, eval_fraction=0.4, public_fraction=0.1).parts()
    assert a["public"] == b["public"]
    assert not ({e.text_b for e in b["train"]} & {e.text_b for e in a["public"]})


class _PairTokenizer:
    """BERT-like: [CLS] a [SEP] b [SEP], segment 0 then 1 (one id per word)."""

    pad_token_id = 0

    def __call__(self, a, b, truncation=True, max_length=64):
        wa, wb = a.split(), b.split()
        ids = [101, *range(1000, 1000 + len(wa)), 102, *range(2000, 2000 + len(wb)), 102]
        types = [0] * (len(wa) + 2) + [1] * (len(wb) + 1)
        return {"input_ids": ids[:max_length], "token_type_ids": types[:max_length]}


class _RecordsSegments(_Constant):
    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.seen = token_type_ids
        return super().forward(input_ids, attention_mask)


def test_sentence_pairs_carry_segment_ids_in_training_and_evaluation(tmp_path):
    from fedsb.data import collate, tokenize_pair
    from fedsb.tasks.base import PairExample

    tok = _PairTokenizer()
    short, long = PairExample("a b", "c", 0), PairExample("a b c", "d e", 1)
    batch = collate([tokenize_pair(short, tok, 64), tokenize_pair(long, tok, 64)], 0, classification=True)
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]

    model = _RecordsSegments(0)
    task = SNLITask(path=str(fixture(tmp_path, 40)))
    task.evaluate_model(model, tok, task.eval_examples(), batch_size=64, precision="fp32")
    assert model.seen is not None and int(model.seen.max()) == 1  # the hypothesis is segment 1
