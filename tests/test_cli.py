"""The command line: help for every command, `stylize image` end to end, clean one-line errors."""

import json
import shutil
from pathlib import Path

import pytest

from stylize.app.cli import build_parser, main

DATA = Path(__file__).parent / "data"
FAST = ["--size", "32", "--iterations", "2", "--scales", "1", "--precision", "float32"]


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: stylize {command}" in out


def test_image_writes_output_and_metadata(tmp_path, capsys):
    out = tmp_path / "result.jpg"
    code = main(["image", str(DATA / "chelsea.png"), str(DATA / "starry_night.jpg"), str(DATA / "shipwreck.jpg"),
                 "--style-blend", "0.7", "0.3", "-o", str(out), *FAST])
    assert code == 0
    assert out.read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as the extension asked
    meta = json.loads((tmp_path / "result.json").read_text())
    assert meta["settings"]["style_blend"] == [0.7, 0.3]
    assert meta["settings"]["format"] == "jpeg"
    assert len(meta["inputs"]["styles"]) == 2
    assert meta["losses"]["iteration"] == [0, 1, 2]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "STYLE"], "content: .*missing.png: no such file"),
        (["NOTIMAGE", "STYLE"], "content: .*not an image"),
        (["CONTENT", "STYLE", "--style-weight", "-1"], "--style-weight: Input should be greater than or equal to 0"),
        (["CONTENT", "STYLE", "--content-layers", "relu9_1"], "unknown VGG19 layer 'relu9_1'"),
        (["CONTENT", "STYLE", "--style-blend", "1", "2"], "style_blend has 2 weights but there are 1 style"),
        (["CONTENT", "STYLE", "--tv-weight", "nan"], "--tv-weight"),
    ],
    ids=["missing", "not-image", "negative-weight", "unknown-layer", "blend-mismatch", "nan-weight"],
)
def test_image_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "notimage.png").write_text("hello")
    subst = {"CONTENT": str(DATA / "chelsea.png"), "STYLE": str(DATA / "starry_night.jpg"),
             "NOTIMAGE": str(tmp_path / "notimage.png")}
    code = main(["image", *[subst.get(a, a) for a in args], "-o", str(tmp_path / "o.png"), *FAST])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("stylize: error: ")
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "o.png").exists()


def test_validate_and_plan(tmp_path, capsys):
    folder = tmp_path / "m"
    (folder / "photos").mkdir(parents=True)
    shutil.copy(DATA / "chelsea.png", folder / "photos" / "cat.png")
    shutil.copy(DATA / "starry_night.jpg", folder / "starry.jpg")
    good = folder / "good.yaml"
    good.write_text("version: 1\noutput: out\ngrid: {contents: [photos/], styles: [starry.jpg]}\n")
    assert main(["validate", str(good)]) == 0
    assert "1 job(s)" in capsys.readouterr().out
    assert main(["plan", str(good)]) == 0
    assert "run   cat__starry" in capsys.readouterr().out

    bad = folder / "bad.yaml"
    bad.write_text("version: 1\noutput: out\npairs:\n  - content: photos/cat.png\n    style: nope.jpg\n"
                   "  - content: photos/cat.png\n    style: []\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pairs[1].style" in err
