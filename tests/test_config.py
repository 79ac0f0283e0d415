"""Config loading: TOML + overrides validate into typed models; errors name file and field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from cluster.config import ConfigError, load_config, parse_override


class Optim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "demo"
    steps: int = Field(10, gt=0)
    optim: Optim = Optim()


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_and_overrides_merge(tmp_path):
    path = write(tmp_path, 'name = "x"\n[optim]\nlr = 0.5\n')
    cfg = load_config(Demo, path, ["optim.lr=2e-4", "steps=7", "optim.betas=[0.8, 0.9]"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("x", 7, 2e-4, (0.8, 0.9))


def test_defaults_without_file():
    assert load_config(Demo).steps == 10


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, "[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Demo, path)
    assert str(path) in str(info.value) and "optim.learning_rate" in str(info.value)
    assert "unknown field" in str(info.value)


def test_bad_value_says_what_was_expected(tmp_path):
    path = write(tmp_path, "steps = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(Demo, path, ["optim.lr=fast"])
    message = str(info.value)
    assert "field 'steps'" in message and "greater than 0" in message
    assert "field 'optim.lr'" in message and "'fast'" in message


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Demo, write(tmp_path, "name = \n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "nope.toml")


def test_override_parsing(tmp_path):
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override('a="quoted"') == (["a"], "quoted")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is a value"):
        load_config(Demo, write(tmp_path, 'name = "x"\n'), ["name.sub=1"])


def test_unknown_field_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(Demo, None, ["optim.lrr=1", "stesp=3", "optim.zzzz=1"])
    message = str(info.value)
    assert "field 'optim.lrr': unknown field; did you mean optim.lr?" in message
    assert "field 'stesp': unknown field; did you mean steps?" in message
    # Nothing close: no guess rather than a wrong one.
    assert "field 'optim.zzzz': unknown field (got 1)" in message


def test_describe_fields_lists_every_leaf_with_default_and_comment():
    from cluster.config import describe_fields
    from trainer.stages.dvae import CONFIG

    lines = list(describe_fields(CONFIG))
    assert "engine.lr = 0.0003" in lines
    assert "data.manifest = (required)  # URL of a manifest.json written by `tessera ingest`" in lines
    assert any(line.startswith("run.best_metric = None  # Also keep the checkpoint") for line in lines)

    def leaves(schema, prefix=""):
        for name, field in schema.model_fields.items():
            nested = field.annotation
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                yield from leaves(nested, f"{prefix}{name}.")
            else:
                yield prefix + name

    assert [line.split(" = ")[0] for line in lines] == list(leaves(CONFIG))
