"""The communication table reproduces the Fed-SB paper's counts, and its bytes are real bytes."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from fedsb.commands.comm import comm
from fedsb.federated.comm import encode, encoded_size
from fedsb.federated.comm_table import (
    breakeven_rounds,
    comm_params,
    comm_row,
    one_time_bytes,
    payload_names,
    payload_shapes,
)
from fedsb.federated.shapes import target_shapes

M = 1e6
K = 1e3
# (model, method, rank, clients, attribute, paper value): Fed-SB paper tables; LoRA baselines r=32.
PAPER = [
    ("mistral-7b", "fedit", 32, 25, "comm_params", 83.9 * M),
    ("mistral-7b", "ffa", 32, 25, "comm_params_paper", 41.9 * M),
    ("mistral-7b", "ffa", 32, 25, "comm_params", 44.04 * M),
    ("mistral-7b", "fedex", 32, 25, "comm_params", 2097 * M),
    ("mistral-7b", "flora", 32, 25, "comm_params", 2097 * M),
    ("mistral-7b", "fedsb", 120, 25, "comm_params", 3.23 * M),
    ("mistral-7b", "fedsb", 160, 25, "comm_params", 5.73 * M),
    ("mistral-7b", "fedsb", 200, 25, "comm_params", 8.96 * M),
    ("gemma-2-9b", "fedit", 32, 25, "comm_params", 108.0 * M),
    ("gemma-2-9b", "ffa", 32, 25, "comm_params_paper", 54.0 * M),
    ("gemma-2-9b", "ffa", 32, 25, "comm_params", 59.18 * M),
    ("gemma-2-9b", "fedex", 32, 25, "comm_params", 2701 * M),
    ("gemma-2-9b", "flora", 32, 25, "comm_params", 2701 * M),
    ("gemma-2-9b", "fedsb", 120, 25, "comm_params", 4.23 * M),
    ("gemma-2-9b", "fedsb", 160, 25, "comm_params", 7.53 * M),
    ("gemma-2-9b", "fedsb", 200, 25, "comm_params", 11.76 * M),
    ("llama-3.2-3b", "fedit", 32, 5, "comm_params", 48.63 * M),
    ("llama-3.2-3b", "ffa", 32, 5, "comm_params_paper", 24.31 * M),
    ("llama-3.2-3b", "ffa", 32, 5, "comm_params", 24.77 * M),
    ("llama-3.2-3b", "fedex", 32, 5, "comm_params", 243.1 * M),
    ("llama-3.2-3b", "flora", 32, 5, "comm_params", 243.1 * M),
    ("llama-3.2-3b", "fedsb", 120, 5, "comm_params", 2.82 * M),
    ("llama-3.2-3b", "fedsb", 160, 5, "comm_params", 5.02 * M),
    ("llama-3.2-3b", "fedsb", 200, 5, "comm_params", 7.84 * M),
    ("bert-base-cased", "ffa", 32, 3, "comm_params", 592 * K),
    ("bert-base-cased", "fedex", 32, 3, "comm_params", 3.55 * M),
    ("bert-base-cased", "fedsb", 32, 3, "comm_params", 26.9 * K),
    ("bert-base-cased", "fedsb", 48, 3, "comm_params", 57.6 * K),
    ("bert-base-cased", "fedsb", 64, 3, "comm_params", 100.6 * K),
]


@pytest.mark.parametrize(("model", "method", "rank", "clients", "key", "paper"), PAPER)
def test_paper_numbers(model, method, rank, clients, key, paper):
    row = comm_row(target_shapes(model), method, rank, clients)
    assert row[key] == pytest.approx(paper, rel=0.005)


def test_shapes():
    mistral, bert = target_shapes("mistral-7b"), target_shapes("bert-base-cased")
    assert len(mistral.modules) == 7 * 32 and mistral.head_params == 0
    assert ("model.layers.0.self_attn.k_proj", 1024, 4096) in mistral.modules
    assert ("model.layers.31.mlp.down_proj", 4096, 14336) in mistral.modules
    assert len(bert.modules) == 24 and {n.rsplit(".", 1)[1] for n, _, _ in bert.modules} == {"query", "value"}
    assert bert.head_shapes == {"classifier.weight": (3, 768), "classifier.bias": (3,)}
    assert bert.head_params == 2307


def test_config_json_path(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for source in (tmp_path, tmp_path / "config.json"):
        shape = target_shapes(source, ["k_proj", "down_proj"])
        assert shape.modules == [
            ("model.layers.0.self_attn.k_proj", 32, 64), ("model.layers.0.mlp.down_proj", 64, 96),
            ("model.layers.1.self_attn.k_proj", 32, 64), ("model.layers.1.mlp.down_proj", 64, 96),
        ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown model shape"):
        target_shapes(tmp_path / "missing.json")


def test_payload_names_per_method():
    def names(method, direction):
        return dict(payload_names("m", method, 6, 4, 2, direction, clients=3))

    assert names("fedsb", "up") == names("fedsb", "down") == {"m.R": (2, 2)}
    assert names("fedit", "down") == {"m.lora_A": (2, 4), "m.lora_B": (6, 2)}
    assert names("ffa", "up") == {"m.lora_B": (6, 2)}
    assert names("fedex", "up") == names("fedit", "up")
    assert names("fedex", "down") == {"m.lora_A": (2, 4), "m.lora_B": (6, 2), "m.residual": (6, 4)}
    assert names("flora", "down") == {"m.lora_A": (6, 4), "m.lora_B": (6, 6)}
    with pytest.raises(ValueError):
        payload_names("m", "fedavg", 6, 4, 2)


@pytest.mark.parametrize(("method", "dtype"), [("fedsb", "fp32"), ("fedit", "bf16"), ("fedex", "fp16")])
def test_row_bytes_are_the_bytes_encode_sends(method, dtype):
    shape = target_shapes("bert-base-cased")
    row = comm_row(shape, method, 8, 3, rounds=5, wire_dtype=dtype)
    for direction, key in (("up", "upload_bytes_per_client_round"), ("down", "download_bytes_per_client_round")):
        shapes = payload_shapes(shape.modules, method, 8, 3, shape.head_shapes, direction)
        assert "head.classifier.weight" in shapes
        assert row[key] == len(encode({n: torch.zeros(s) for n, s in shapes.items()}, dtype))
    per_round = row["upload_bytes_per_client_round"] + row["download_bytes_per_client_round"]
    assert row["total_bytes"] == row["one_time_bytes"] + 5 * 3 * per_round


def test_one_time_costs():
    shape = target_shapes("bert-base-cased")
    r, clients = 16, 3
    assert one_time_bytes(shape.modules, r, clients, "random") == {}
    central = one_time_bytes(shape.modules, r, clients, "central")
    broadcast = payload_shapes(shape.modules, "fedit", r)
    assert central == {"init_broadcast": clients * encoded_size(broadcast)}
    fed = one_time_bytes(shape.modules, r, clients, "federated", oversample=10)
    assert fed["init_broadcast"] == central["init_broadcast"]
    k = r + 10
    up_numbers = sum((d_out + d_in) * k for _, d_out, d_in in shape.modules)
    # the sketches carry exactly (d_out + d_in)(r + p) fp32 numbers per module, plus small headers
    assert 0 < fed["init_sketch_up"] - clients * 4 * up_numbers < clients * 2 * 4096
    fed2 = one_time_bytes(shape.modules, r, clients, "federated", oversample=10, power_iters=2)
    assert fed2["init_sketch_up"] > 2.5 * fed["init_sketch_up"]
    row = comm_row(shape, "fedsb", r, clients, init="federated")
    assert row["one_time_bytes"] == sum(fed.values()) and row["init"] == "federated"
    assert comm_row(shape, "fedit", r, clients, init="federated")["one_time_bytes"] == 0


def test_ffa_true_count_differs_from_paper_only_for_non_square_layers():
    assert comm_params(target_shapes("bert-base-cased"), "ffa", 32, 3) == (592131, 592131)
    true, paper = comm_params(target_shapes("mistral-7b"), "ffa", 32, 25)
    # per layer, sum of (d_out - d_in) * r / 2: k and v (GQA), gate and up, down; q and o are square
    per_layer = (2 * (1024 - 4096) + 2 * (14336 - 4096) + (4096 - 14336)) * 32 // 2
    assert true - paper == 32 * per_layer == 2097152


def test_breakeven_matches_brute_force():
    shape = target_shapes("llama-3.2-3b")
    fedit = comm_row(shape, "fedit", 32, 5)
    for r in (64, 200):
        fedsb = comm_row(shape, "fedsb", r, 5)
        k = breakeven_rounds(fedsb, fedit)

        def total(row, rounds):
            return comm_row(shape, row["method"], row["rank"], 5, rounds)["total_bytes"]

        assert total(fedsb, k) < total(fedit, k) and total(fedsb, k - 1) >= total(fedit, k - 1)
    assert breakeven_rounds(comm_row(shape, "fedsb", 32, 5, init="random"), fedit) == 1
    assert breakeven_rounds(fedit, fedit) is None


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command("comm")(comm)

    @app.command("noop")  # a second command keeps "comm" as an explicit subcommand
    def _noop() -> None: ...

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["comm", *args], env={"COLUMNS": "160"})


def test_cli_json_is_one_list(cli):
    res = cli("--model-shape", "llama-3.2-3b", "--rank", "120", "--rank", "160", "--clients", "5", "--rounds", "3",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("fedsb", 120), ("fedsb", 160), ("fedit", 32), ("ffa", 32), ("fedex", 32), ("flora", 32)
    ]  # fmt: skip
    assert all(r["rounds"] == 3 and r["clients"] == 5 for r in rows)
    assert rows[0]["breakeven_rounds_vs_fedit"] == breakeven_rounds(rows[0], rows[2])


def test_cli_table_and_breakeven_line(cli):
    res = cli("--model-shape", "mistral-7b", "--method", "fedsb", "--rank", "120", "--clients", "25")
    assert res.exit_code == 0, res.output
    assert "3.23M" in res.output and "12.93 MB" in res.output
    assert "Fed-SB r=120" in res.output and "after 2 rounds" in res.output
    res = cli("--model-shape", "bert-base-cased", "--method", "ffa", "--rank", "8", "--rank", "16",
              "--clients", "3", "--json")  # fmt: skip
    assert [r["rank"] for r in json.loads(res.stdout)] == [8, 16]


def test_breakeven_reference_is_the_strategys_declaration(cli, monkeypatch):
    """comm reads the reference from Strategy.break_even_reference, not from a name in comm.py."""
    from fedsb.aggregation.registry import get_strategy

    fedsb_cls = get_strategy("fedsb")
    assert fedsb_cls.break_even_reference == "fedit"
    monkeypatch.setattr(fedsb_cls, "break_even_reference", "ffa")
    args = ("--model-shape", "mistral-7b", "--method", "fedsb", "--rank", "120", "--clients", "25")
    (row,) = json.loads(cli(*args, "--json").stdout)
    assert "breakeven_rounds_vs_fedit" not in row
    ffa = comm_row(target_shapes("mistral-7b"), "ffa", 32, 25, 1)
    assert row["breakeven_rounds_vs_ffa"] == breakeven_rounds(row, ffa)
    assert "vs FFA-LoRA r=32" in cli(*args).output
    monkeypatch.setattr(fedsb_cls, "break_even_reference", None)
    (row,) = json.loads(cli(*args, "--json").stdout)
    assert not any(k.startswith("breakeven") for k in row) and "drops below" not in cli(*args).output


@pytest.mark.parametrize(
    "args",
    [
        ("--model-shape", "mistral-7b", "--method", "fedavg", "--rank", "8", "--clients", "2"),
        ("--model-shape", "no-such-model", "--rank", "8", "--clients", "2"),
        ("--model-shape", "mistral-7b", "--rank", "8", "--clients", "2", "--wire-dtype", "int8"),
        ("--model-shape", "mistral-7b", "--clients", "2"),
    ],
)
def test_cli_rejects_bad_arguments(cli, args):
    res = cli(*args)
    assert res.exit_code == 2, res.output  # a usage error, not a crash


@pytest.mark.parametrize("name", ["mistral-7b", "gemma-2-9b", "llama-3.2-3b", "bert-base-cased"])
def test_builtin_layers_are_the_meta_models_layers(name):
    """`fedsb comm` lays the built-ins out without torch; transformers' meta model must agree:
    every linear layer, in order, and the head."""
    from fedsb.federated.shapes import BUILTIN_CONFIGS, DEFAULT_TARGETS, _infer_task, _shapes_cached, builtin_layers

    cfg = {**BUILTIN_CONFIGS[name]}
    cfg.setdefault("num_labels", 3)
    task = _infer_task(cfg)
    layers, head = builtin_layers(cfg, task)
    every = tuple(sorted({n.rsplit(".", 1)[-1] for n, _, _ in layers}))
    meta = _shapes_cached(name, json.dumps(cfg, sort_keys=True), every, task)
    assert meta.modules == layers and meta.head_shapes == head
    assert target_shapes(name) == _shapes_cached(name, json.dumps(cfg, sort_keys=True), DEFAULT_TARGETS[name], task)  # the preset path


def test_the_torch_free_wire_table_matches_the_torch_one():
    from fedsb.federated import comm
    from fedsb.federated.wire_size import WIRE_ST_DTYPES

    assert list(WIRE_ST_DTYPES) == list(comm.WIRE_DTYPES)
    assert all(WIRE_ST_DTYPES[name] == comm._ST_NAME[dtype] for name, dtype in comm.WIRE_DTYPES.items())
