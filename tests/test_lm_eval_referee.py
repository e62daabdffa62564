"""lm-evaluation-harness as the outside referee: fedsb's multiple-choice scores must equal its own.

A tiny random Llama (saved with its character tokenizer, as lm-eval's HFLM loads it) carries a
LoRA-SB adapter that `fedsb export` turns into a peft adapter; lm-eval scores that through peft,
fedsb scores its own adapter, on the first 20 examples of two tasks (option text and labels).
Skipped only when the `harness` extra (lm-eval) is not installed; `make test` installs it.
"""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval")

from fedsb.adapter.export import save_adapter  # noqa: E402
from fedsb.adapter.inject import inject_adapters  # noqa: E402
from fedsb.cli import app  # noqa: E402
from fedsb.evaluation import evaluate  # noqa: E402
from fedsb.init import init_random  # noqa: E402
from fedsb.models import char_tokenizer  # noqa: E402
from fedsb.referee import compare, lm_eval_samples  # noqa: E402
from fedsb.tasks import get_task  # noqa: E402
from fixtures_tasks import tiny_llama, write_json  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "evals" / "lm_eval"
WORDS = "sun rock leaf water heat cold iron salt light sound plant seed cloud wind magnet ice".split()
N = 20


def _arc(i: int, rng: random.Random) -> dict:
    k = rng.choice([3, 4, 4, 5])
    opts = [" ".join(rng.sample(WORDS, rng.randint(1, 4))) for _ in range(k)]
    gold = rng.randrange(k)
    labels = [f"answer{j + 1}" for j in range(k)]
    body = " ".join(f"Answer{j + 1}: {o}" for j, o in enumerate(opts))
    return {
        "instruction": f"Please choose the correct answer to the question: Which is {WORDS[i % len(WORDS)]} like?\n\n"
        f"{body}\n\nAnswer format: {'/'.join(labels)}",
        "input": "", "output": f"the correct answer is {labels[gold]}", "answer": labels[gold],
    }


def _boolq(i: int, rng: random.Random) -> dict:
    gold = rng.choice(["true", "false"])
    return {
        "instruction": f"Please answer the following question with true or false, question: is {rng.choice(WORDS)} "
        f"a {rng.choice(WORDS)}{'?' if i % 2 else ''}\n\nAnswer format: true/false",
        "input": "", "output": f"the correct answer is {gold}", "answer": gold,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data root, saved base model, fedsb run folder with an adapter, and its peft export."""
    root = tmp_path_factory.mktemp("referee")
    rng = random.Random(0)
    for folder, make in (("ARC-Easy", _arc), ("boolq", _boolq)):
        (root / "data" / "commonsense" / folder).mkdir(parents=True)
        write_json(root / "data" / "commonsense" / folder / "test.json", [make(i, rng) for i in range(N + 5)])
    tok = char_tokenizer()
    base = tiny_llama(len(tok), seed=1)
    base.config.pad_token_id, base.config.bos_token_id, base.config.eos_token_id = 0, 1, 2
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    layers = inject_adapters(base, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    init_random(layers, seed=3)
    g = torch.Generator().manual_seed(4)
    for layer in layers.values():
        layer.R.weight.data = 0.5 * torch.randn(4, 4, generator=g)  # a visible change of the model
    save_adapter(base, root / "run" / "adapter", base_model=str(root / "base"))
    res = CliRunner().invoke(app, ["export", str(root / "run"), str(root / "peft")])
    assert res.exit_code == 0, res.output
    return root, base.eval(), tok


def test_export_is_a_readable_peft_adapter_on_the_trained_base(setup):
    root, _, _ = setup
    out = root / "peft"
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str((root / "base").resolve())
    readme = (out / "README.md").read_text()
    assert f"Base model: `{(root / 'base').resolve()}`" in readme and "lm_eval --model hf" in readme


def test_fedsb_equals_lm_eval_example_by_example(setup, monkeypatch):
    root, model, tok = setup
    monkeypatch.setenv("FEDSB_DATA", str(root / "data"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = simple_evaluate(
            model="hf",
            model_args=f"pretrained={root / 'base'},peft={root / 'peft'},dtype=float32",
            tasks=["fedsb_arc_e_text", "fedsb_boolq_label"],
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
            limit=N, log_samples=True, device="cpu", batch_size=8,
        )
        for name, protocol in (("arc_e", "text"), ("boolq", "label")):
            task = get_task(name, protocol=protocol)
            examples = task.eval_examples()[:N]  # lm-eval's --limit: the first N
            mine = evaluate(model, tok, task, examples, mode="loglik", precision="fp32", progress=False, details=True)
            report = compare(mine["examples"], lm_eval_samples(out["samples"][f"fedsb_{name}_{protocol}"]))
            assert report["n"] == N
            assert report["max_abs_score_diff"] < 5e-4, report  # fp32 sums of ~100-nat log-likelihoods
            assert report["same_pick"] == {"acc": N, "acc_norm": N}, report
            assert report["same_verdict"] == {"acc": N, "acc_norm": N}, report
            lm = out["results"][f"fedsb_{name}_{protocol}"]
            assert mine["metrics"]["acc"] == pytest.approx(lm["acc,none"])
            assert mine["metrics"]["acc_norm"] == pytest.approx(lm["acc_norm,none"])
            assert mine["protocol"] == protocol
    finally:
        torch.set_num_threads(threads)


def test_lm_eval_documents_are_fedsbs_prompts_on_every_offline_record():
    """The referee renders the real files on its own; every record must match fedsb's rendering."""
    from fedsb.tasks.io import default_data_root

    data = default_data_root()
    if data is None or not (data / "commonsense").is_dir():
        pytest.skip("no ../shared/data")
    from lm_eval.tasks import TaskManager, get_task_dict

    from fedsb.tasks.prompts import render_prompt

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    tasks = get_task_dict(["fedsb_commonsense_text", "fedsb_commonsense_label"], manager)
    assert len(tasks) == 10
    for name, lm_task in tasks.items():
        benchmark, protocol = name.removeprefix("fedsb_").rsplit("_", 1)
        task = get_task(benchmark, protocol=protocol, data_root=data)
        docs, examples = list(lm_task.test_docs()), task.eval_examples()
        assert len(docs) == len(examples) > 0
        for doc, ex in zip(docs, examples):
            context = render_prompt(ex.instruction, task.template) + task.loglik_prefix
            mine = [context + task.target_delimiter + o for o in ex.options]
            theirs = [lm_task.doc_to_text(doc) + " " + c for c in lm_task.doc_to_choice(doc)]
            assert (mine, ex.gold_index) == (theirs, lm_task.doc_to_target(doc)), ex.meta["id"]
