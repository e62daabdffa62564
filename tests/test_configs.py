"""Every shipped config loads and validates; bad keys and values give one clear line."""

from pathlib import Path

import pytest

from fedsb.commands.demo import demo_config_dict, demo_strategies
from fedsb.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    import tomllib

    if "experiment" in tomllib.loads(path.read_text()):  # a sweep file (`fedsb sweep`)
        from fedsb.sweep import load_sweep

        assert load_sweep(path).selection_cells()  # builds and validates every method's config
    else:
        load_config(path)


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"arithmetic.toml", "commonsense.toml", "arithmetic-small.toml", "commonsense-small.toml"} <= names


def test_embedded_demo_config_validates():
    cfg = config_from_dict(demo_config_dict())
    assert cfg.federation.num_clients == 10 and cfg.federation.partition == "dirichlet"


def test_packaged_demo_strategies_are_registered_and_build_valid_configs():
    import json

    from fedsb.aggregation.registry import strategy_names

    strategies = demo_strategies()
    assert len(strategies) >= 2 and set(strategies) <= set(strategy_names())
    for name, settings in strategies.items():
        values = {"federation.strategy": name, **settings}
        cfg = config_from_dict(demo_config_dict(), [f"{k}={json.dumps(v)}" for k, v in values.items()])
        assert cfg.federation.strategy == name and cfg.adapter.rank == settings["adapter.rank"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr in \[train\]; allowed: .*lr"):
        config_from_dict({"train": {"lrr": 1}})


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError, match=r"federation.strategy = 'fedavg': allowed values are 'fedex', 'fedit', 'fedsb', 'ffa', 'flora'"):
        config_from_dict({"federation": {"strategy": "fedavg"}})
    with pytest.raises(ConfigError, match="train.lr = -1.0: must be > 0"):
        config_from_dict({"train": {"lr": -1}})
    with pytest.raises(ConfigError, match="adapter.rank = 'x': expected an integer"):
        config_from_dict({"adapter": {"rank": "x"}})


def test_overrides_use_toml_syntax(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 1e-4\n")
    cfg = load_config(path, ["train.lr=3e-3", "federation.strategy=fedit", "adapter.targets=[\"q_proj\"]"])
    assert cfg.train.lr == 3e-3 and cfg.federation.strategy == "fedit" and cfg.adapter.targets == ["q_proj"]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])


def test_toml_syntax_error_names_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(path)
