"""The engine flags come from `Settings`, and the README's option table documents exactly them."""

import re
from pathlib import Path

import pytest

from stylize.app.cli import build_parser
from stylize.app.flags import engine_flags, engine_overrides
from stylize.engine.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_option_rows() -> list[str]:
    """The first cells of the README's "| option | meaning |" table."""
    lines = README.read_text().splitlines()
    start = lines.index("| option | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split(" | ")[0])
    return rows


def image_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["image"]


def test_readme_table_documents_every_engine_flag_and_nothing_stale():
    documented = {flag for row in readme_option_rows() for flag in re.findall(r"--[a-z][a-z-]*", row)}
    engine = {flag.name for flag in engine_flags()}
    image_options = {s for a in image_parser()._actions for s in a.option_strings}
    assert engine - documented == set(), "engine flags missing from the README's option table"
    assert documented - image_options == set(), "README option rows for flags `stylize image` does not have"


def test_readme_table_shows_each_flags_choices():
    rows = " ".join(readme_option_rows())
    for flag in engine_flags():
        choices = flag.options.get("choices")
        if choices:
            shown = re.search(re.escape(flag.name) + r" ([\w\\|]+)`", rows)
            assert shown, f"README: {flag.name} without its choices {choices}"
            assert shown.group(1).split("\\|") == choices, f"README: {flag.name} shows {shown.group(1)}"


def test_every_setting_is_a_flag_unless_marked_off():
    flags = {flag.dest for flag in engine_flags()}
    off = {name for name, info in Settings.model_fields.items() if (info.json_schema_extra or {}).get("cli") is False}
    assert flags | off == set(Settings.model_fields)
    assert off == {"tolerance_window", "format"}  # a new field is a new flag unless someone says otherwise
    for name, info in Settings.model_fields.items():
        assert info.description and ". " in info.description, f"Settings.{name}: describe what, then why the default"


@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--size", "64", "--tv-weight", "1e4"], {"size": 64, "tv_weight": 1e4}),
    (["--style-blend", "0.7", "0.3", "--preserve-color"], {"style_blend": (0.7, 0.3), "preserve_color": True}),
    (["--style-layers", "relu1_1", "relu2_1", "--style-layer-weights", "1", "2"],
     {"style_layers": ("relu1_1", "relu2_1"), "style_layer_weights": (1.0, 2.0)}),
    (["--optimizer", "adam", "--learning-rate", "0.05", "--init", "random", "--seed", "3"],
     {"optimizer": "adam", "learning_rate": 0.05, "init": "random", "seed": 3}),
    (["--precision", "float32", "--quality", "80", "--max-pixels", "300000", "--save-every", "5"],
     {"precision": "float32", "quality": 80, "max_pixels": 300000, "save_every": 5}),
])
def test_flags_parse_into_settings_fields(argv, expected):
    args = image_parser().parse_args(["c.png", "s.png", "-o", "o.png", *argv])
    overrides = engine_overrides(args)
    assert overrides == expected
    Settings(**overrides)  # valid as given


def test_choices_come_from_the_settings_types(capsys):
    with pytest.raises(SystemExit):
        image_parser().parse_args(["c.png", "s.png", "-o", "o.png", "--pooling", "min"])
    assert "invalid choice: 'min' (choose from 'max', 'avg')" in capsys.readouterr().err


def test_help_shows_the_settings_defaults():
    helps = {flag.dest: flag.help for flag in engine_flags()}
    assert helps["size"].endswith(f"(default {Settings().size})")
    assert helps["style_layers"].endswith("(default relu1_1 relu2_1 relu3_1 relu4_1 relu5_1)")
    assert "(default" not in helps["preserve_color"]  # a switch, off unless given
