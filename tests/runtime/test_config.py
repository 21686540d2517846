"""runtime.config: YAML + dotted overrides into typed dataclasses, validation, --help."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from runtime.config import (ConfigError, describe_fields, format_help, load_config, parse_config,
                            save_resolved_config)


@dataclass
class ToyModel:
    depth: int = field(default=2, metadata={"help": "number of blocks"})
    width: float = field(default=1.0, metadata={"help": "width multiplier"})
    attention: str = field(default="joint", metadata={"help": "attention type"})
    num_frames: int = field(default=16, metadata={"help": "frames per clip"})
    tubelet_size: int = field(default=2, metadata={"help": "frames per tubelet"})

    def validate(self):
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames={self.num_frames} is not divisible by "
                             f"tubelet_size={self.tubelet_size}")


@dataclass
class ToyStage:
    model: ToyModel = field(default_factory=ToyModel, metadata={"help": "the model"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    use_ema: bool = field(default=False, metadata={"help": "keep an EMA"})
    resume: str = field(default="", metadata={"help": "'' or auto"})
    tags: list[str] = field(default_factory=list, metadata={"help": "free-form tags"})
    name: str | None = field(default=None, metadata={"help": "optional name"})


@dataclass
class ToyData:
    num_frames: int | None = field(default=None, metadata={"help": "from model.num_frames"})

    def validate(self):
        if self.num_frames is None:
            raise ValueError("data.num_frames was not derived")


@dataclass
class ResolvingStage:
    """A stage whose data section takes num_frames from the model section in ``resolve()``."""
    model: ToyModel = field(default_factory=ToyModel, metadata={"help": "the model"})
    data: ToyData = field(default_factory=ToyData, metadata={"help": "the data"})

    def resolve(self):
        model_frames, data_frames = self.model.num_frames, self.data.num_frames
        if data_frames is not None and data_frames != model_frames:
            raise ValueError(f"data.num_frames={data_frames} disagrees with "
                             f"model.num_frames={model_frames}")
        return dataclasses.replace(self, data=ToyData(model_frames))


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "model": {"depth": 6}}))
    cfg = load_config(ToyStage, path, ["model.depth=8", "betas=[0.8, 0.99]", "use_ema=true"])
    assert cfg.model.depth == 8          # override beats YAML
    assert cfg.lr == 0.5                 # YAML beats default
    assert cfg.model.width == 1.0        # default kept
    assert cfg.betas == (0.8, 0.99) and isinstance(cfg.betas, tuple)
    assert cfg.use_ema is True


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(ToyStage, overrides=["lr=1"]).lr == 1.0
    with pytest.raises(ConfigError, match="model.depth: expected an integer"):
        load_config(ToyStage, overrides=["model.depth=2.5"])


@pytest.mark.parametrize("override, message", [
    ("model.depht=3", "unknown config key 'model.depht'"),
    ("lr=fast", "lr: expected a number"),
    ("use_ema=3", "use_ema: expected true/false"),
    ("betas=[0.9]", "betas: expected 2 values"),
    ("model=3", "expected a mapping for section ToyModel"),
    ("model.num_frames=15", "num_frames=15 is not divisible by tubelet_size=2"),
    ("nokey", "not of the form key.sub=value"),
])
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ToyStage, overrides=[override])


def test_unknown_key_in_yaml_names_file_and_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dept: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(ToyStage, path)
    assert str(path) in str(info.value) and "valid keys here: attention, depth" in str(info.value)


def test_missing_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyStage, tmp_path / "none.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(ToyStage, path)


def test_optional_field_and_null():
    assert load_config(ToyStage, overrides=["name=run1"]).name == "run1"
    assert load_config(ToyStage, overrides=["name=null"]).name is None
    with pytest.raises(ConfigError, match="null is not allowed"):
        load_config(ToyStage, overrides=["lr=null"])


def test_cli_forms_and_local_rank(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.25\n")
    cfg = parse_config(ToyStage, ["--config", str(path), "model.depth=3", "--set", "model.width=2",
                                  "--resume", "auto", "--use_ema=true", "--local_rank=1"])
    assert (cfg.lr, cfg.model.depth, cfg.model.width, cfg.resume, cfg.use_ema) == \
        (0.25, 3, 2.0, "auto", True)


def test_cli_error_exits_with_message(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(ToyStage, ["model.nope=1"], prog="toy")
    assert info.value.code == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err


def test_help_lists_every_field_with_its_text(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyStage, ["--help"], prog="toy")
    out = capsys.readouterr().out
    for name, _, _, text in describe_fields(ToyStage):
        assert name in out and text in out


def test_undocumented_field_is_rejected():
    @dataclass
    class Undocumented:
        x: int = 1

    with pytest.raises(ConfigError, match="Undocumented.x has no help text"):
        format_help(Undocumented)


def test_resolve_runs_after_the_last_override_and_before_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_frames: 8\n")
    assert load_config(ResolvingStage).data.num_frames == 16
    assert load_config(ResolvingStage, path).data.num_frames == 8
    cfg = load_config(ResolvingStage, path, ["model.num_frames=4"])
    assert cfg.data.num_frames == 4  # the derived value follows the override
    assert cfg.resolve() == cfg  # idempotent: a resolved config loads again unchanged
    saved = save_resolved_config(cfg, tmp_path / "run")
    assert yaml.safe_load(saved.read_text())["data"] == {"num_frames": 4}
    assert load_config(ResolvingStage, saved) == cfg
    with pytest.raises(ConfigError, match="data.num_frames=6 disagrees with model.num_frames=4"):
        load_config(ResolvingStage, path, ["model.num_frames=4", "data.num_frames=6"])
    with pytest.raises(ConfigError, match="num_frames=15 is not divisible"):  # still validated
        load_config(ResolvingStage, path, ["model.num_frames=15"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ToyStage, overrides=["model.depth=5", "tags=[a, b]"])
    path = save_resolved_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    again = load_config(ToyStage, path)
    assert again == cfg
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert dataclasses.asdict(again)["model"]["depth"] == 5
