import pytest

from fedpt.config import FedPTConfig, load_config
from fedpt.errors import FedPTError


def test_preset_loads_and_round_trips(tmp_path):
    cfg = load_config(preset="tiny")
    path = tmp_path / "c.toml"
    cfg.save(path)
    assert load_config(path=path).to_dict() == cfg.to_dict()
    assert FedPTConfig.from_json(cfg.to_json()).to_dict() == cfg.to_dict()


def test_overrides_parse_toml_values():
    cfg = load_config(preset="tiny", overrides=["train.lr=0.01", "lora.targets=['q_proj']", "proxy.alpha=2",
                                                 "run.systems=['fedpt','fedavg-pt']"])
    assert cfg.train.lr == 0.01 and cfg.lora.targets == ["q_proj"]
    assert cfg.proxy.alpha == 2.0 and isinstance(cfg.proxy.alpha, float)
    assert cfg.run.systems == ["fedpt", "fedavg-pt"]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("trian.lr=1", "unknown config section [trian]"),
    ("train.steps=abc", "train.steps must be int"),
    ("train.steps=0", "train.steps must be > 0"),
    ("federation.clients_per_round=9", "clients_per_round must be between 1 and num_clients"),
    ("model.dtype=float8", "model.dtype"),
    ("run.systems=['fedpt','nope']", "run.systems = 'nope'"),
    ("train.lr", "--set expects section.key=value"),
    ("faults.crash=1.5", "faults.crash must be in [0.0, 1.0]"),
    ("faults.hang=0.2", "faults.hang > 0 needs faults.hang_seconds > 0"),
    ("privacy.dp='locale'", "privacy.dp = 'locale' is not one of: off, central, local"),
    ("privacy.delta=1.0", "privacy.delta must be strictly between 0 and 1"),
    ("privacy.noise_multiplier=0", "privacy.noise_multiplier must be > 0"),
    ("federation.round_timeout=0", "federation.round_timeout must be > 0"),
    ("federation.min_results=4", "federation.min_results must be between 1 and clients_per_round"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(FedPTError) as err:
        load_config(preset="tiny", overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(FedPTError, match="not valid TOML"):
        load_config(path=bad)
    with pytest.raises(FedPTError, match="does not exist"):
        load_config(path=tmp_path / "missing.toml")
    with pytest.raises(FedPTError, match="unknown preset"):
        load_config(preset="huge")
