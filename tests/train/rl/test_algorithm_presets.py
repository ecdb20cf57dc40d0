"""rl.algorithm as a preset of rl.loss (ALGORITHM_PRESETS): it fills what the user left unset and
refuses, in one line naming both, a setting that contradicts it; through the loader (YAML sections,
command-line overrides, saved configs) as well as in Python."""

from __future__ import annotations

import pytest
import yaml

from megatron_lcr.config import ConfigError, load_config, save_resolved
from megatron_lcr.rl.losses import POLICY_LOSSES, PolicyLossConfig
from megatron_lcr.train.rl.config import ALGORITHM_PRESETS, RLConfig, RLRunConfig


def load(tmp_path, rl: dict, overrides: tuple[str, ...] = ()) -> RLRunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_path": "model"}, "rl": rl}))
    return load_config(RLRunConfig, path, list(overrides))


def test_every_preset_names_a_registered_loss():
    assert set(ALGORITHM_PRESETS) == {"grpo", "dapo", "gspo", "cispo"}
    assert {p["name"] for p in ALGORITHM_PRESETS.values()} <= set(POLICY_LOSSES)


@pytest.mark.parametrize(
    "algorithm, name", [("grpo", "ppo"), ("dapo", "ppo"), ("gspo", "gspo"), ("cispo", "cispo")]
)
def test_unset_loss_name_is_filled_from_the_preset(algorithm, name):
    given = PolicyLossConfig(eps_low=0.1)
    rl = RLConfig(algorithm=algorithm, loss=given)
    assert (rl.loss.name, rl.loss.eps_low) == (name, 0.1)
    assert given.name is None  # filled on a copy: the caller's config is not changed
    matching = RLConfig(algorithm=algorithm, loss=PolicyLossConfig(name=name))
    assert matching.loss.name == name


def test_conflicting_loss_name_is_an_error_naming_both():
    with pytest.raises(ValueError) as err:
        RLConfig(algorithm="gspo", loss=PolicyLossConfig(name="ppo"))
    assert str(err.value) == (
        "rl.loss.name='ppo' conflicts with rl.algorithm='gspo' (its preset sets 'gspo'): drop one of them"
    )


def test_no_algorithm_means_no_preset():
    assert RLConfig().algorithm is None and RLConfig().loss.name == "ppo"  # GRPO's loss
    for name in POLICY_LOSSES:
        assert RLConfig(loss=PolicyLossConfig(name=name)).loss.name == name


def test_loader_fills_the_preset_under_a_partial_loss_section(tmp_path):
    # The section merges over the class defaults, not over a default RLConfig whose loss.name the
    # default preset already filled ('ppo'), which would then conflict with algorithm gspo.
    cfg = load(tmp_path, {"algorithm": "gspo", "loss": {"eps_low": 3e-4, "eps_high": 4e-4}})
    assert (cfg.rl.loss.name, cfg.rl.loss.eps_low) == ("gspo", 3e-4)
    assert load(tmp_path, {"algorithm": "cispo"}).rl.loss.name == "cispo"
    assert load(tmp_path, {}, ("rl.algorithm=gspo",)).rl.loss.name == "gspo"


def test_loader_takes_loss_name_from_yaml_and_command_line(tmp_path):
    assert load(tmp_path, {"loss": {"name": "gspo"}}).rl.loss.name == "gspo"
    assert load(tmp_path, {}, ("rl.loss.name=cispo",)).rl.loss.name == "cispo"
    assert load(tmp_path, {"algorithm": "gspo"}, ("rl.loss.name=gspo",)).rl.loss.name == "gspo"


def test_loader_refuses_a_conflict_and_the_old_ratio_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rl.loss.name='ppo' conflicts with rl.algorithm='gspo'"):
        load(tmp_path, {"algorithm": "gspo", "loss": {"name": "ppo"}})
    with pytest.raises(ConfigError, match=r"rl.loss.name='cispo' conflicts with rl.algorithm='dapo'"):
        load(tmp_path, {"algorithm": "dapo"}, ("rl.loss.name=cispo",))
    with pytest.raises(ConfigError, match=r"unknown key 'rl.loss.ratio'"):
        load(tmp_path, {"algorithm": "gspo", "loss": {"ratio": "token"}})
    with pytest.raises(ConfigError, match=r"command line: unknown key 'rl.loss.ratio'"):
        load(tmp_path, {}, ("rl.loss.ratio=sequence",))


@pytest.mark.parametrize("rl", [{}, {"algorithm": "gspo"}, {"loss": {"name": "cispo"}}])
def test_saved_config_loads_back_equal(tmp_path, rl):
    cfg = load(tmp_path, rl)
    save_resolved(cfg, tmp_path / "resolved.yaml")
    assert load_config(RLRunConfig, tmp_path / "resolved.yaml") == cfg
