"""Tests for megatron_lcr.config: YAML + override loading, coercion, errors, save, help.

The module uses postponed annotations on purpose: from_dict must resolve string
annotations through typing.get_type_hints, as component modules will do the same.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Literal

import pytest
import yaml

from megatron_lcr import config
from megatron_lcr.config import (
    ConfigError,
    config_help,
    deep_merge,
    from_dict,
    load_config,
    parse_overrides,
    save_resolved,
    to_dict,
)


class Precision(enum.Enum):
    BF16 = "bf16"
    FP32 = "fp32"


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (per optimizer step, unitless)."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """Adam beta coefficients (unitless)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule shape."""


@dataclasses.dataclass(kw_only=True)
class TrainerConfig:
    steps: int
    """Number of optimizer steps (steps)."""
    use_amp: bool = False
    """Enable automatic mixed precision (flag)."""
    precision: Precision = Precision.BF16
    """Parameter dtype."""
    save_dir: Path | None = None
    """Checkpoint directory (path); None disables saving."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer settings."""


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (ranks)."""
    num_heads: int = 8
    """Attention heads (count)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.tp:
            raise ValueError(f"tp ({self.tp}) must divide num_heads ({self.num_heads})")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name (free text)."""
    files: list[str] = dataclasses.field(default_factory=list)
    """Training data files (paths)."""
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-source sampling weights (unitless)."""
    trainer: TrainerConfig = dataclasses.field(default_factory=lambda: TrainerConfig(steps=10))
    """Trainer settings."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Parallel layout."""
    seed: int = 1234
    # no attribute docstring on purpose: config_help must show an empty doc


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loading


def test_yaml_then_overrides_precedence(tmp_path):
    path = write(
        tmp_path,
        "name: from_file\n"
        "trainer:\n  steps: 100\n  use_amp: true\n  optim:\n    schedule: constant\n"
        "files: [x.jsonl]\n",
    )
    cfg = load_config(RunConfig, path, ["trainer.steps=200", "files=[a.jsonl, b.jsonl]"])
    assert cfg.name == "from_file"  # file beats default
    assert cfg.trainer.steps == 200  # override beats file
    assert cfg.trainer.use_amp is True
    assert cfg.trainer.optim.schedule == "constant"
    assert cfg.trainer.optim.lr == 1e-6  # untouched default
    assert cfg.files == ["a.jsonl", "b.jsonl"]  # lists replace, not append


def test_partial_section_keeps_parent_factory_defaults():
    # RunConfig's factory sets trainer.steps=10 (TrainerConfig has no default for it).
    cfg = from_dict(RunConfig, {"trainer": {"use_amp": True}})
    assert cfg.trainer.steps == 10
    assert cfg.trainer.use_amp is True


@dataclasses.dataclass(kw_only=True)
class DerivedConfig:
    kind: str = "a"
    """What the preset is for."""
    width: int | None = None
    """Derived from kind when unset; set to anything else it must match."""

    def __post_init__(self) -> None:
        preset = {"a": 1, "b": 2}[self.kind]
        if self.width not in (None, preset):
            raise ValueError(f"width={self.width} conflicts with kind={self.kind!r}")
        self.width = preset


@dataclasses.dataclass(kw_only=True)
class HoldsDerived:
    derived: DerivedConfig = dataclasses.field(default_factory=DerivedConfig)
    """A section whose __post_init__ derives a field."""


def test_partial_section_derives_again_instead_of_keeping_derived_defaults():
    # The default DerivedConfig() holds width=1 (derived from kind 'a'); a section merged over it
    # would carry width=1 as if set and conflict with kind 'b'. It merges over the class defaults.
    assert from_dict(HoldsDerived, {"derived": {"kind": "b"}}).derived.width == 2
    assert load_config(HoldsDerived, None, ["derived.kind=b"]).derived.width == 2


def test_no_file_means_defaults_plus_overrides():
    assert load_config(RunConfig, None) == RunConfig()
    cfg = load_config(RunConfig, None, ["parallel.tp=2", "weights={a: 1, b: 0.5}"])
    assert cfg.parallel.tp == 2
    assert cfg.weights == {"a": 1.0, "b": 0.5}
    assert isinstance(cfg.weights["a"], float)


def test_empty_file_means_defaults(tmp_path):
    assert load_config(RunConfig, write(tmp_path, "# only a comment\n")) == RunConfig()


def test_exponent_string_becomes_float_from_yaml_and_override(tmp_path):
    path = write(tmp_path, "trainer:\n  optim:\n    lr: 1e-6\n")
    assert yaml.safe_load(path.read_text())["trainer"]["optim"]["lr"] == "1e-6"  # the trap
    cfg = load_config(RunConfig, path)
    assert cfg.trainer.optim.lr == 1e-6 and type(cfg.trainer.optim.lr) is float
    cfg = load_config(RunConfig, path, ["trainer.optim.lr=3e-5"])
    assert cfg.trainer.optim.lr == 3e-5 and type(cfg.trainer.optim.lr) is float


def test_int_accepted_for_float_field():
    cfg = from_dict(RunConfig, {"trainer": {"optim": {"lr": 1, "betas": [0, 1]}}})
    assert cfg.trainer.optim.lr == 1.0 and type(cfg.trainer.optim.lr) is float
    assert cfg.trainer.optim.betas == (0.0, 1.0)


@pytest.mark.parametrize(("value", "shown"), [(1, "int 1"), ("yes", "str 'yes'")])
def test_bool_field_rejects_non_bools(value, shown):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"trainer": {"use_amp": value}}, source="s.yaml")
    assert str(err.value) == f"s.yaml: key 'trainer.use_amp' expects bool, got {shown}"


def test_yaml_words_stay_strings_and_yes_is_not_a_bool(tmp_path):
    # YAML 1.1 would make these False and a date; str fields must get the text.
    cfg = load_config(RunConfig, write(tmp_path, "name: no\n"), ["files=[2024-01-01]"])
    assert cfg.name == "no"
    assert cfg.files == ["2024-01-01"]
    with pytest.raises(ConfigError, match="expects bool, got str 'yes'"):
        load_config(RunConfig, write(tmp_path, "trainer:\n  use_amp: yes\n"))


def test_path_enum_and_optional():
    cfg = from_dict(RunConfig, {"trainer": {"save_dir": "ckpt/run1", "precision": "fp32"}})
    assert cfg.trainer.save_dir == Path("ckpt/run1")
    assert cfg.trainer.precision is Precision.FP32
    by_name = from_dict(RunConfig, {"trainer": {"save_dir": None, "precision": "FP32"}})
    assert by_name.trainer.save_dir is None
    assert by_name.trainer.precision is Precision.FP32
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"trainer": {"precision": "int8"}})
    assert str(err.value) == (
        "<dict>: key 'trainer.precision' expects one of 'bf16', 'fp32', got str 'int8'"
    )


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_file_suggests_close_match(tmp_path):
    path = write(tmp_path, "trainer:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == (
        f"{path}: unknown key 'trainer.optim.lrr' (did you mean 'trainer.optim.lr'?)"
    )


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"parallel": {"zzz": 1}})
    assert str(err.value) == "<dict>: unknown key 'parallel.zzz' (valid keys: tp, num_heads)"


def test_unknown_key_on_command_line(tmp_path):
    path = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path, ["trainer.stepz=3"])
    assert str(err.value) == (
        "command line: unknown key 'trainer.stepz' (did you mean 'trainer.steps'?)"
    )


def test_wrong_type_message():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"trainer": {"optim": {"lr": "abc"}}}, source="x.yaml")
    assert str(err.value) == "x.yaml: key 'trainer.optim.lr' expects float, got str 'abc'"


def test_wrong_type_on_command_line_blames_command_line(tmp_path):
    path = write(tmp_path, "trainer:\n  steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path, ["trainer.steps=many"])
    assert str(err.value) == "command line: key 'trainer.steps' expects int, got str 'many'"


def test_list_element_error_names_index():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"files": ["a", 3]})
    assert str(err.value) == "<dict>: key 'files[1]' expects str, got int 3"


def test_literal_violation_lists_choices():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"trainer": {"optim": {"schedule": "linear"}}})
    assert str(err.value) == (
        "<dict>: key 'trainer.optim.schedule' expects one of 'constant', 'cosine', "
        "got str 'linear'"
    )


def test_section_must_be_mapping():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"parallel": [1, 2]})
    assert str(err.value) == (
        "<dict>: key 'parallel' expects a mapping (ParallelConfig), got list [1, 2]"
    )


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainerConfig, {"use_amp": True}, source="t.yaml", prefix="trainer")
    assert str(err.value) == "t.yaml: missing required key 'trainer.steps'"


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: config file not found"


def test_yaml_syntax_error_mentions_line(tmp_path):
    path = write(tmp_path, "name: a\ntrainer:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    # PyYAML notices the unclosed bracket at end of file; the message also points at its start.
    assert str(err.value) == (
        f"{path}: invalid YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'"
        " (while parsing a flow sequence at line 3, column 10)"
    )


def test_yaml_indentation_error_names_its_line(tmp_path):
    path = write(tmp_path, "name: a\n  seed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == (
        f"{path}: invalid YAML at line 2, column 7: mapping values are not allowed here"
    )


def test_yaml_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "name: a\nseed: 1\nname: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: invalid YAML at line 3, column 1: duplicate key 'name'"


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    # `<<` merges are the one legitimate way to repeat a key; they must not count as duplicates.
    path = write(tmp_path, "parallel: &p\n  tp: 2\ntrainer:\n  steps: 3\n")
    assert load_config(RunConfig, path).parallel.tp == 2
    data = yaml.load("base: &b {tp: 2}\nuse: {<<: *b, tp: 4}\n", Loader=config._Loader)
    assert data["use"] == {"tp": 4}


def test_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: top level must be a mapping, got list ['a', 'b']"


def test_post_init_error_prefixed_with_file_and_section(tmp_path):
    path = write(tmp_path, "parallel:\n  tp: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: parallel: tp (3) must divide num_heads (8)"
    assert isinstance(err.value.__cause__, ValueError)


def test_error_messages_are_one_line():
    assert str(ConfigError("a.yaml: parallel: first\n   second\n")) == (
        "a.yaml: parallel: first second"
    )


# --------------------------------------------------------------------------- overrides


def test_parse_overrides_builds_nested_dict():
    assert parse_overrides(
        ["trainer.lr=1e-6", "parallel.tp=2", "model.name=foo", "data.files=[a.jsonl, b.jsonl]",
         "flag=true", "opt=", "parallel.tp=4"]
    ) == {
        "trainer": {"lr": "1e-6"},  # still a string here; from_dict coerces it per field
        "parallel": {"tp": 4},  # later items win
        "model": {"name": "foo"},
        "data": {"files": ["a.jsonl", "b.jsonl"]},
        "flag": True,
        "opt": None,
    }


@pytest.mark.parametrize("item", ["trainer.lr", "=1", "a..b=1", ".a=1", "a.=1"])
def test_parse_overrides_rejects_malformed_items(item):
    with pytest.raises(ConfigError) as err:
        parse_overrides([item])
    assert str(err.value) == (
        f"command line: malformed override {item!r} (expected dotted.key=value)"
    )


def test_parse_overrides_conflict_and_bad_yaml():
    with pytest.raises(ConfigError, match=r"'a\.b=2' conflicts with earlier value of 'a'"):
        parse_overrides(["a=1", "a.b=2"])
    with pytest.raises(ConfigError, match=r"cannot parse value of 'a=\[1, 2'"):
        parse_overrides(["a=[1, 2"])
    with pytest.raises(TypeError):
        parse_overrides("a=1")


def test_deep_merge_is_pure():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    override = {"a": {"b": 2, "e": {"f": 3}}, "d": {"x": 1}}
    merged = deep_merge(base, override)
    assert merged == {"a": {"b": 2, "c": [1], "e": {"f": 3}}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}
    assert override == {"a": {"b": 2, "e": {"f": 3}}, "d": {"x": 1}}
    merged["a"]["c"].append(2)
    merged["a"]["e"]["f"] = 4
    assert base["a"]["c"] == [1] and override["a"]["e"]["f"] == 3


# --------------------------------------------------------------------------- save / to_dict


def sample_config() -> RunConfig:
    return RunConfig(
        name="no",  # a YAML-1.1 bool word: must be quoted on save
        files=["a.jsonl", "1e-6"],
        weights={"a": 0.25},
        trainer=TrainerConfig(
            steps=7,
            precision=Precision.FP32,
            save_dir=Path("/tmp/ckpt"),
            optim=OptimConfig(lr=3e-7, betas=(0.8, 0.9), schedule="constant"),
        ),
        parallel=ParallelConfig(tp=4),
    )


def test_to_dict_is_plain():
    data = to_dict(sample_config())
    assert data["trainer"] == {
        "steps": 7,
        "use_amp": False,
        "precision": "fp32",
        "save_dir": "/tmp/ckpt",
        "optim": {"lr": 3e-7, "betas": [0.8, 0.9], "schedule": "constant"},
    }
    assert data["parallel"] == {"tp": 4, "num_heads": 8}


def test_save_resolved_round_trip_and_no_temp_left(tmp_path):
    cfg = sample_config()
    path = tmp_path / "out" / "nested" / "resolved.yaml"  # parents do not exist yet
    save_resolved(cfg, path)
    assert load_config(RunConfig, path) == cfg
    assert os.listdir(path.parent) == ["resolved.yaml"]
    save_resolved(RunConfig(), path)  # overwriting an existing file also works
    assert load_config(RunConfig, path) == RunConfig()
    assert os.listdir(path.parent) == ["resolved.yaml"]


def test_save_resolved_onto_directory_fails_cleanly(tmp_path):
    target = tmp_path / "resolved.yaml"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        save_resolved(RunConfig(), target)
    assert sorted(os.listdir(tmp_path)) == ["resolved.yaml"]  # no stray temp file
    assert os.listdir(target) == ["keep"]


def test_save_resolved_failed_rename_keeps_original(tmp_path, monkeypatch):
    path = tmp_path / "resolved.yaml"
    save_resolved(sample_config(), path)
    original = path.read_text()

    def failing_replace(src, dst):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_resolved(RunConfig(), path)
    assert path.read_text() == original
    assert os.listdir(tmp_path) == ["resolved.yaml"]


# --------------------------------------------------------------------------- help


def test_config_help_lists_dotted_keys_with_types_defaults_and_docs():
    text = config_help(RunConfig)
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert list(lines)[0] == "KEY"
    expected_keys = [
        "name", "files", "weights", "trainer", "trainer.steps", "trainer.use_amp",
        "trainer.precision", "trainer.save_dir", "trainer.optim", "trainer.optim.lr",
        "trainer.optim.betas", "trainer.optim.schedule", "parallel", "parallel.tp",
        "parallel.num_heads", "seed",
    ]
    assert list(lines)[1:] == expected_keys
    lr = lines["trainer.optim.lr"].split()
    assert lr[:3] == ["trainer.optim.lr", "float", "1.0e-06"]
    assert lines["trainer.optim.lr"].endswith("Peak learning rate (per optimizer step, unitless).")
    # The parent's default_factory sets steps=10, so that is the effective default.
    assert lines["trainer.steps"].split()[:3] == ["trainer.steps", "int", "10"]
    assert "'constant' | 'cosine'" in lines["trainer.optim.schedule"]
    assert "Path | None" in lines["trainer.save_dir"]
    assert lines["seed"].split() == ["seed", "int", "1234"]  # undocumented: empty doc
    assert config_help(TrainerConfig).splitlines()[1].split()[:3] == ["steps", "int", "(required)"]
