"""Tests for cmpagl.config: the one YAML loader, its error messages, overrides and inheritance."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from cmpagl.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "configs" / "synthetic_data.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    depths: tuple[int, ...] = (2, 2, 6, 2)
    window: tuple[int, int] = (7, 7)


@dataclass
class Rich:
    """A dataclass using every supported field type, for the generic loader."""

    required: int
    lr: float = 1e-4
    on: bool = True
    maybe: int | None = None
    scale: tuple[float, float] | None = None
    mode: Literal["off", "add", "concat"] = "add"
    names: tuple[str, ...] = ("x",)
    inner: Inner = field(default_factory=Inner)


# --- the shipped file and the defaults ------------------------------------------------------


def test_shipped_synthetic_config_loads_with_expected_values() -> None:
    cfg = load_config(SHIPPED)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.name == "synthetic"
    assert cfg.data.root == "data/synthetic"
    assert cfg.data.image_size == 128
    assert cfg.data.format == "auto"
    # Position words and counts in synthetic captions: no crop, flip or rotation there.
    assert cfg.data.aug_random_resized_crop == (1.0, 1.0)
    assert isinstance(cfg.data.aug_random_resized_crop[0], float)
    assert not (cfg.data.aug_hflip or cfg.data.aug_vflip or cfg.data.aug_rot90)


def test_defaults() -> None:
    cfg = from_dict(ExperimentConfig, {})
    assert cfg == ExperimentConfig()
    assert cfg.seed == 0 and cfg.data.image_size == 128 and cfg.data.image_dir is None
    assert cfg.data.normalize_mean == (0.485, 0.456, 0.406)
    # A partly given section keeps the defaults of the keys it leaves out.
    assert from_dict(ExperimentConfig, {"data": {"image_size": 64}}).data.num_workers == 2


def test_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"<dict>: required: missing required key of type int"):
        from_dict(Rich, {})


def test_round_trip_through_plain_dict() -> None:
    cfg = ExperimentConfig(seed=3, data=DataConfig(image_dir="imgs", captions_per_image=5))
    plain = to_dict(cfg)
    assert plain["data"]["normalize_std"] == [0.229, 0.224, 0.225]  # tuples become lists
    assert from_dict(ExperimentConfig, plain) == cfg
    rich = Rich(required=1, maybe=4, scale=(0.5, 1.0), names=("a", "b"), inner=Inner((1, 2)))
    rich_plain = to_dict(rich)
    assert rich_plain["scale"] == [0.5, 1.0] and rich_plain["inner"]["depths"] == [1, 2]
    assert from_dict(Rich, rich_plain) == rich


def test_generic_types_are_converted() -> None:
    rich = from_dict(Rich, {"required": 1, "lr": 3, "names": ["a", "b"], "scale": [1, 2]})
    assert rich.lr == 3.0 and isinstance(rich.lr, float)  # an int is accepted for a float
    assert rich.names == ("a", "b")  # a YAML list becomes the tuple
    assert rich.scale == (1.0, 2.0) and all(isinstance(x, float) for x in rich.scale)
    assert from_dict(Rich, {"required": 1, "maybe": None}).maybe is None
    assert from_dict(Rich, {"required": 1, "maybe": 5}).maybe == 5
    assert from_dict(Rich, {"required": 1, "inner": {"depths": [1, 1]}}).inner.depths == (1, 1)
    assert from_dict(Rich, {"required": 1, "inner": {"depths": []}}).inner.depths == ()


@pytest.mark.parametrize(
    ("annotation", "value", "shown"),
    [
        (Path, "a/b", "Path"),
        (list[int], [1, 2], r"list\[int\]"),
        (dict[str, float], {"itc": 1.0}, r"dict\[str, float\]"),
        (Colour, "red", "Colour"),
        (Any, 1, "Any"),
        (int | str, 1, r"int \| str"),
        (tuple, [1], "tuple"),
    ],
)
def test_unsupported_annotation_is_a_type_error(annotation: Any, value: Any, shown: str) -> None:
    """The loader converts only the kinds of field the configs use; a dataclass with another
    kind is a programming error, named with the field and its annotation, not a YAML error."""
    odd = make_dataclass(
        "Odd", [("seed", int, field(default=0)), ("odd", annotation, field(default=None))]
    )
    assert from_dict(odd, {"seed": 1}).seed == 1  # the other fields are unaffected
    with pytest.raises(
        TypeError, match=rf"^config field odd has an unsupported annotation {shown};"
    ):
        from_dict(odd, {"odd": value})


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_top_level_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "sed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "'sed'" in message and "did you mean 'seed'" in message
    assert info.value.key == "sed"


def test_unknown_nested_key_names_dotted_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "data:\n  imag_size: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "'data.imag_size'" in message and "did you mean 'data.image_size'" in message


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'.*valid keys here: data, "):
        from_dict(ExperimentConfig, {"zzz": 1})


# --- wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("image_size: '128'", r"data\.image_size: expected int, got str '128'"),
        ("image_size: 1.5", r"data\.image_size: expected int, got float 1\.5"),
        ("image_size: true", r"data\.image_size: expected int, got bool True"),
        ("check_images: yes", r"data\.check_images: expected bool, got str 'yes'"),
        ("check_images: 1", r"data\.check_images: expected bool, got int 1"),
        ("name: 5", r"data\.name: expected str, got int 5"),
        ("image_dir: 5", r"data\.image_dir: expected str \| None, got int 5"),
        (
            "normalize_mean: [0.5, 0.5]",
            r"data\.normalize_mean: expected tuple\[float, float, float\] \(3 items\), got 2",
        ),
        (
            "aug_random_resized_crop: [0.5, x]",
            r"data\.aug_random_resized_crop\[1\]: expected float, got str 'x'",
        ),
        (
            "format: kp",
            r"data\.format: expected one of 'auto', 'karpathy', 'precomp', got str 'kp'",
        ),
    ],
)
def test_wrong_type_names_key_file_and_expected_type(
    tmp_path: Path, yaml_value: str, expected: str
) -> None:
    path = write(tmp_path / "c.yaml", f"data:\n  {yaml_value}\n")
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_section_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data: expected a mapping for DataConfig, got int 3"):
        from_dict(ExperimentConfig, {"data": 3})


def test_generic_wrong_types() -> None:
    with pytest.raises(ConfigError, match=r"mode: expected one of 'off', 'add', 'concat'"):
        from_dict(Rich, {"required": 1, "mode": "mul"})
    with pytest.raises(ConfigError, match=r"names: expected tuple\[str, \.\.\.\], got str 'abc'"):
        from_dict(Rich, {"required": 1, "names": "abc"})
    with pytest.raises(ConfigError, match=r"names\[1\]: expected str, got int 2"):
        from_dict(Rich, {"required": 1, "names": ["a", 2]})
    with pytest.raises(ConfigError, match=r"inner\.window: expected tuple\[int, int\] \(2 items"):
        from_dict(Rich, {"required": 1, "inner": {"window": [7, 7, 7]}})
    with pytest.raises(ConfigError, match=r"^<dict>: on: expected bool, got int 1$"):
        from_dict(Rich, {"required": 1, "on": 1})
    # X | None: an error inside the value names the item, one about the value says None is ok
    with pytest.raises(ConfigError, match=r"scale\[0\]: expected float, got str 'a'"):
        from_dict(Rich, {"required": 1, "scale": ["a", 1]})
    with pytest.raises(ConfigError, match=r"maybe: expected int \| None, got str 'x'"):
        from_dict(Rich, {"required": 1, "maybe": "x"})


# --- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("train.lr=1e-4", ["train", "lr"], 1e-4),
        ("seed=3", ["seed"], 3),
        ("data.check_images=false", ["data", "check_images"], False),
        ("model.depths=[2,2,6,2]", ["model", "depths"], [2, 2, 6, 2]),
        ("data.name=ucm", ["data", "name"], "ucm"),
        ("data.image_dir=null", ["data", "image_dir"], None),
        ("data.name=a=b", ["data", "name"], "a=b"),  # only the first '=' splits
    ],
)
def test_parse_override_values_are_typed_by_yaml(text: str, keys: list[str], value: object) -> None:
    parsed_keys, parsed = parse_override(text)
    assert parsed_keys == keys
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["seed", "=3", "data.=3", ".seed=3", "a..b=1"])
def test_malformed_override_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--set .*malformed override"):
        parse_override(text)


def test_overrides_are_applied_and_typed() -> None:
    overrides = [
        "seed=7",
        "data.image_size=64",
        "data.check_images=false",
        "data.name=ucm",
        "data.aug_random_resized_crop=[1, 1]",
        "data.captions_per_image=null",
    ]
    cfg = load_config(SHIPPED, overrides=overrides)
    assert cfg.seed == 7 and cfg.data.image_size == 64 and cfg.data.check_images is False
    assert cfg.data.name == "ucm" and cfg.data.captions_per_image is None
    assert cfg.data.aug_random_resized_crop == (1.0, 1.0)
    assert cfg.data.root == "data/synthetic"  # untouched keys keep the file's values


def test_later_override_wins_and_input_is_not_mutated() -> None:
    raw = {"data": {"image_size": 32}}
    out = apply_overrides(raw, ["data.image_size=64", "data.image_size=96"])
    assert out == {"data": {"image_size": 96}}
    assert raw == {"data": {"image_size": 32}}


def test_override_of_unknown_key_names_set() -> None:
    with pytest.raises(ConfigError, match=r"^--set data\.imag_size=3: unknown key") as info:
        load_config(SHIPPED, overrides=["data.imag_size=3"])
    assert "did you mean 'data.image_size'" in str(info.value)
    assert info.value.source == "--set data.imag_size=3"


def test_override_with_wrong_type_names_set() -> None:
    with pytest.raises(ConfigError, match=r"^--set data\.image_size=big: data\.image_size: exp"):
        load_config(SHIPPED, overrides=["data.image_size=big"])


def test_override_below_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"--set 'seed\.x=1': 'seed' holds int 0, not a mapping"):
        load_config(SHIPPED, overrides=["seed.x=1"])


# --- files: base inheritance, missing file, syntax errors -----------------------------------


def test_base_inheritance_deep_merges(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "seed: 1\ndata:\n  name: ucm\n  image_size: 256\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\ndata:\n  image_size: 224\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: mid.yaml\nseed: 2\n")
    cfg = load_config(child)
    assert cfg.seed == 2  # the child wins
    assert cfg.data.image_size == 224  # the middle file wins over the root
    assert cfg.data.name == "ucm"  # deep merge keeps sibling keys of the root


def test_error_in_base_file_names_the_base_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "data:\n  image_size: big\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"data\.image_size: expected int") as info:
        load_config(child)
    assert str(info.value).startswith(f"{base}: ")


def test_base_cycle_is_detected(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'base' inheritance cycle: .*a\.yaml -> .*b\.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_file_names_it_and_the_referrer(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found \(base of .*child"):
        load_config(child)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    # The fourth line is indented less than its siblings: a syntax error on line 4.
    path = write(tmp_path / "bad.yaml", "seed: 1\ndata:\n  image_size: 3\n x: 1\n")
    with pytest.raises(ConfigError, match="YAML syntax error") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4:")


def test_override_value_that_is_not_yaml_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^--set 'seed=\[1,': value is not valid YAML"):
        parse_override("seed=[1,")


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r":2:1: YAML syntax error: found duplicate key 'seed'"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "empty.yaml", "")) == ExperimentConfig()


# --- saving ----------------------------------------------------------------------------------


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(SHIPPED, overrides=["data.image_dir=imgs", "data.name=yes", "seed=5"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    # "yes" must be quoted on disk so that it reads back as a str under any YAML schema.
    assert "name: 'yes'" in out.read_text(encoding="utf-8")
    assert load_config(out) == cfg


def test_image_size_must_match_the_encoder() -> None:
    from cmpagl.config import check_experiment

    cfg = from_dict(ExperimentConfig, {"data": {"image_size": 64}})
    with pytest.raises(ConfigError, match=r"model.gswin.img_size \(128\) must equal"):
        check_experiment(cfg)
    ok = from_dict(
        ExperimentConfig, {"data": {"image_size": 64}, "model": {"gswin": {"img_size": 64}}}
    )
    assert check_experiment(ok) is ok
