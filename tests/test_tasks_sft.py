"""Task "sft": TRL's SFT formats, the loss mask, chat templates, record errors, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsb.config import ConfigError
from fedsb.data import IGNORE_INDEX, tokenize_all
from fedsb.models import char_tokenizer, tiny_causal_lm
from fedsb.tasks import get_task
from fedsb.tasks.io import DataFormatError
from fedsb.tasks.sft import SftTask, TemplateError, extract_answer, normalize_answer, parse_record, read_sft_file

from fixtures_tasks import smollm2_tokenizer, write_jsonl

TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
}


def trained_text(tok, item) -> str:
    return tok.decode([i for i, lab in zip(item.input_ids, item.labels) if lab != IGNORE_INDEX])


def masked_text(tok, item) -> str:
    return tok.decode([i for i, lab in zip(item.input_ids, item.labels) if lab == IGNORE_INDEX])


# --- the loss mask ---------------------------------------------------------------------------


def test_chat_loss_is_on_assistant_turns_only_with_a_final_eos():
    tok = char_tokenizer()  # its template puts no end-of-turn token: the EOS is appended
    item = parse_record(TWO_TURNS).tokenize(tok, "raw", 512)
    assert trained_text(tok, item) == "4\n6\n</s>"
    assert item.labels[-1] == tok.eos_token_id == item.input_ids[-1]
    assert [lab for lab in item.labels if lab != IGNORE_INDEX].count(tok.eos_token_id) == 1  # only the final turn
    assert masked_text(tok, item) == "system: Be brief.\nuser: 2+2?\nassistant: user: 3+3?\nassistant: "
    assert len(item.input_ids) == len(item.labels)


def test_smollm2_chat_loss_covers_each_end_of_turn_token():
    tok = smollm2_tokenizer()
    item = parse_record(TWO_TURNS).tokenize(tok, "raw", 512)
    trained = [i for i, lab in zip(item.input_ids, item.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "4<|im_end|>6<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id and trained[-1] == tok.eos_token_id  # pitfall 9
    masked = tok.decode([i if lab == IGNORE_INDEX else tok.unk_token_id or 0 for i, lab in zip(item.input_ids, item.labels)])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in masked and "<|im_start|>user\n3+3?<|im_end|>" in masked
    assert masked.endswith("<|im_start|>assistant\n" + tok.decode([tok.unk_token_id or 0]) * 2 + "\n")  # "6<|im_end|>" trains, the newline does not


def test_prompt_completion_loss_is_on_the_completion_and_eos():
    tok = char_tokenizer()
    rec = {"prompt": "Q: 2+2=", "completion": " 4"}
    item = parse_record(rec).tokenize(tok, "raw", 64)
    assert trained_text(tok, item) == " 4</s>"
    assert masked_text(tok, item) == "Q: 2+2="
    assert item.labels[-1] == tok.eos_token_id
    alpaca = parse_record(rec).tokenize(tok, "alpaca", 512)  # task.template applies to string prompts
    assert "### Instruction:\nQ: 2+2=" in masked_text(tok, alpaca) and trained_text(tok, alpaca) == " 4</s>"


def test_conversational_prompt_completion_trains_the_completion_messages():
    tok = char_tokenizer()
    rec = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    item = parse_record(rec).tokenize(tok, "raw", 64)
    assert masked_text(tok, item) == "user: hi\nassistant: "
    assert trained_text(tok, item) == "yo\n</s>" and item.labels[-1] == tok.eos_token_id


def test_a_long_example_keeps_its_end():
    tok = char_tokenizer()
    item = parse_record({"prompt": "x" * 100, "completion": "answer"}).tokenize(tok, "raw", 20)
    assert len(item.input_ids) == 20
    assert trained_text(tok, item) == "answer</s>" and item.labels[-1] == tok.eos_token_id


def test_tokenize_all_dispatches_to_the_example():
    tok = char_tokenizer()
    ex = parse_record(TWO_TURNS)
    assert tokenize_all([ex], tok, "raw", 512)[0] == ex.tokenize(tok, "raw", 512)


# --- chat template rendering -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["char", "smollm2"])
def test_pieces_are_the_chat_template_rendering_and_prompt_matches_training(which):
    tok = char_tokenizer() if which == "char" else smollm2_tokenizer()
    ex = parse_record(TWO_TURNS)
    full = tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)
    assert "".join(text for text, _ in ex.segments(tok, "raw")) == full
    prompt = ex.prompt_text(tok, "raw")
    assert prompt == tok.apply_chat_template(TWO_TURNS["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert ex.reference == "6"
    # what evaluation feeds the model is exactly the start of what training fed it
    from fedsb.evaluation import _encode

    item = ex.tokenize(tok, "raw", 512)
    ids = _encode(tok, prompt)
    assert item.input_ids[: len(ids)] == ids
    rest = [lab for lab in item.labels[len(ids) :] if lab != IGNORE_INDEX]
    assert tok.decode(rest).startswith("6") and rest[-1] == tok.eos_token_id  # after the prompt: the final turn trains


def test_a_tokenizer_without_chat_template_is_a_one_line_error():
    tok = char_tokenizer()
    tok.chat_template = None
    ex = parse_record(TWO_TURNS, "data.jsonl:7")
    with pytest.raises(TemplateError, match=r"^data\.jsonl:7: a conversational record needs a tokenizer with a chat template") as e:
        ex.tokenize(tok, "raw", 64)
    assert "\n" not in str(e.value)
    # string prompt/completion records need no template
    assert parse_record({"prompt": "a", "completion": "b"}).tokenize(tok, "raw", 64).labels[-1] == tok.eos_token_id


def test_a_template_that_is_not_prefix_stable_is_refused():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="cannot be masked"):
        parse_record(TWO_TURNS, "f:1").tokenize(tok, "raw", 64)


# --- bad records: one line with file, line and what was expected -----------------------------

BAD = [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]', "invalid JSON"),
    ('{"text": "hello"}', "expected a 'messages' list or 'prompt' and 'completion' keys"),
    ('{"messages": []}', "'messages' should be a non-empty list"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}', "messages[0]: missing key 'content'"),
    ('{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}', "messages[0]: role 'human' is not one of"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}', "messages[0].content should be a string, got int"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}', "the last message should be the assistant's"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}', "messages[1]: empty assistant content"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "starts with an assistant message"),
    ('{"prompt": "a", "completion": ""}', "empty completion"),
    ('{"prompt": "", "completion": "b"}', "empty prompt"),
    ('{"prompt": "a"}', "missing key 'completion'"),
    ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}', "both be strings or both lists of messages"),
    ('{"prompt": "a", "completion": "b", "answer": 4}', "'answer' should be a string, got int"),
    ('["a", "b"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,expected", BAD)
def test_bad_records_fail_with_file_line_and_what_was_expected(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        read_sft_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and expected in msg and "\n" not in msg


def test_a_good_file_reads_every_format_with_its_location(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [TWO_TURNS, {"prompt": "p", "completion": "c", "answer": "c", "id": 3}]
    write_jsonl(path, rows)
    examples = read_sft_file(path)
    assert [e.conversational for e in examples] == [True, False]
    assert examples[1].where == f"{path}:2" and examples[1].gold == "c"
    assert examples[0].trained == (False, False, True, False, True)


# --- options and the answer check ------------------------------------------------------------


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"answer_check": "fuzzy"}, "answer_check = 'fuzzy'"),
        ({"answer_check": "regex"}, "answer_regex"),
        ({"answer_regex": "x"}, "answer_regex"),
        ({"answer_check": "regex", "answer_regex": "("}, "not a regular expression"),
        ({"pathh": "x"}, "unknown key task.options.pathh"),
    ],
)
def test_bad_options_are_config_errors(options, expected):
    from fedsb.tasks.base import validate_task_options

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        validate_task_options("sft", options)


def test_answer_check_exact_and_regex():
    assert normalize_answer("  The Answer:  1,234. ") == normalize_answer("the answer: 1234")
    assert extract_answer("so 3; The answer is 42. The answer is 7.", r"answer is (-?\d+)") == "7"
    assert extract_answer("nothing", r"answer is (\d+)") is None
    ex = parse_record({"prompt": "q", "completion": "2 + 2 = 4. The answer is 4.", "answer": "4"})
    regex = get_task("sft", answer_check="regex", answer_regex=r"answer is (-?\d+)")
    assert regex.score("... The answer is 4.", ex) == {"correct": True}
    assert regex.score("The answer is 5", ex) == {"correct": False}
    assert regex.score("4", ex) == {"correct": False}  # the pattern must be found in the generation
    exact = get_task("sft", answer_check="exact")
    assert exact.score(" 4. ", ex) == {"correct": True}
    assert get_task("sft").score("anything", ex) == {}


# --- evaluation ------------------------------------------------------------------------------


def test_evaluate_model_loss_matches_the_models_own_loss_and_keeps_samples(tmp_path):
    tok = char_tokenizer()
    model = tiny_causal_lm(vocab_size=len(tok), seed=3)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    examples = [parse_record(TWO_TURNS), parse_record({"prompt": "Q: 1+1=", "completion": " 2", "answer": "2"})]
    task = SftTask(answer_check="exact", num_samples=1, max_new_tokens=3)
    out = task.evaluate_model(model, tok, examples, batch_size=2, precision="fp32", template="raw", max_length=256)
    # reference: the model's own (mean) loss per example, weighted by its trained tokens
    total = count = 0
    with torch.no_grad():
        for ex in examples:
            it = ex.tokenize(tok, "raw", 256)
            n = sum(lab != IGNORE_INDEX for lab in it.labels[1:])
            loss = model(input_ids=torch.tensor([it.input_ids]), labels=torch.tensor([it.labels])).loss
            total, count = total + float(loss) * n, count + n
    assert out["eval_tokens"] == count
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["n"] == 2 and 0 <= out["correct"] <= 2 and len(out["ci95"]) == 2
    assert len(out["samples"]) == 1 and set(out["samples"][0]) == {"prompt", "reference", "generation", "correct"}


def test_train_and_eval_files_from_options(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    task = get_task("sft", path=str(tmp_path / "t.jsonl"))
    assert len(task.train_examples()) == 5 and len(task.train_examples(limit=2, seed=1)) == 2
    assert task.eval_examples() == []
    with pytest.raises(ConfigError, match="task.options.path"):
        get_task("sft").train_examples()
