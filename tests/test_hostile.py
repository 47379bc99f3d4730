"""Hostile manifests: nothing is written outside the output root, no manifest data is ever
executed or unpickled, and weights files cannot run code."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stylize.catalog import manifest as manifest_module
from stylize.errors import ManifestError, StorageError
from stylize.catalog.jobs import JobRunner, Prepared, prepare
from stylize.catalog.manifest import load_manifest, validate
from stylize.catalog.storage import Storage, check_below

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
FAST = "{size: 32, iterations: 2, scales: 1, precision: float32}"


@pytest.fixture
def folder(tmp_path):
    """A manifest folder with a photo and a painting."""
    shutil.copy(DATA / "chelsea.png", tmp_path / "cat.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "starry.jpg")
    return tmp_path


def write(folder: Path, body: str) -> str:
    path = folder / "manifest.yaml"
    path.write_text(f"version: 1\noutput: out\ndefaults: {FAST}\n{body}")
    return str(path)


@pytest.mark.parametrize(
    "name, why",
    [
        ("../escaped", "would escape the output folder"),
        ("deep/../../escaped", "would escape the output folder"),
        ("/tmp/escaped", "is absolute"),
        ("s3://other-bucket/escaped", "is a URI"),
        ("file:///tmp/escaped", "is a URI"),
        ("..\\\\escaped", "backslash"),
    ],
)
def test_output_names_outside_the_output_root_are_refused(folder, name, why):
    uri = write(folder, f"pairs: [{{content: cat.png, style: starry.jpg, name: '{name}'}}]\n")
    with pytest.raises(ManifestError, match=re.escape(why)) as error:
        load_manifest(uri)
    assert error.value.problems[0][0] == "pairs[0].name"
    assert any(p == "pairs[0].name" and why in m for p, m in validate(uri)[1])
    assert not (folder / "out").exists() and not (folder / "escaped").exists()


def test_a_symlinked_folder_pointing_outside_is_not_written_through(folder, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (folder / "out").mkdir()
    (folder / "out" / "link").symlink_to(outside, target_is_directory=True)
    uri = write(folder, "pairs: [{content: cat.png, style: starry.jpg, name: link/cat}]\n")
    job = next(load_manifest(uri).jobs(Storage()))
    outcome = prepare(job, Storage())
    assert outcome.status == "failed"
    assert f"resolves to {outside}, outside the output root {folder / 'out'}" in outcome.error
    assert list(outside.iterdir()) == []


def test_an_output_root_that_is_itself_a_link_is_fine(folder, tmp_path_factory):
    real = tmp_path_factory.mktemp("real-out")
    (folder / "out").symlink_to(real, target_is_directory=True)
    uri = write(folder, "pairs: [{content: cat.png, style: starry.jpg, name: sub/cat}]\n")
    assert isinstance(prepare(next(load_manifest(uri).jobs(Storage())), Storage()), Prepared)


@pytest.mark.parametrize(
    "root, uri",
    [
        ("s3://bucket/out", "s3://other-bucket/out/x.png"),
        ("s3://bucket/out", "s3://bucket/outside.png"),
        ("s3://bucket/out", "s3://bucket/out2/x.png"),
        ("s3://bucket/out", "/tmp/x.png"),
        ("/data/out", "s3://bucket/out/x.png"),
        ("/data/out", "/data/other/x.png"),
    ],
)
def test_check_below_refuses_anything_outside_the_root(root, uri):
    with pytest.raises(StorageError, match="outside the output root"):
        check_below(root, uri)


def test_check_below_accepts_the_inside():
    check_below("s3://bucket/out", "s3://bucket/out/a/b.png")
    check_below("s3://bucket", "s3://bucket/b.png")
    check_below("/data/out", "/data/out/a/b.png")


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
        "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "!!python/name:os.system",
    ],
)
def test_yaml_tags_that_construct_objects_are_refused_unrun(folder, tag):
    marker = folder / "MARKER"
    uri = write(folder, f"pairs:\n  - content: {tag.format(marker=marker)}\n    style: starry.jpg\n")
    with pytest.raises(ManifestError, match="tags that construct objects are not allowed"):
        load_manifest(uri)
    assert not marker.exists()


def test_the_manifest_loader_is_a_safe_loader():
    assert issubclass(manifest_module._Loader, yaml.SafeLoader)
    assert not issubclass(manifest_module._Loader, (yaml.FullLoader, yaml.UnsafeLoader))


# Calls that would run or unpickle data, and what makes them safe, if anything.
FORBIDDEN = [
    (r"\b(c?pickle|cloudpickle|dill|marshal|jsonpickle)\.loads?\(", None),
    (r"\bshelve\.open\(", None),
    (r"(?<![\w.])(eval|exec)\(", None),
    (r"\bos\.(system|popen)\(", None),
    (r"shell\s*=\s*True", None),
    (r"\byaml\.(unsafe_load|full_load|load_all|Loader\b|FullLoader|UnsafeLoader)", None),
    (r"\byaml\.load\(", r"Loader=_Loader\)"),  # _Loader is a SafeLoader (test above)
    (r"\btorch\.load\(", r"weights_only=True"),
]


def test_no_code_path_evaluates_or_unpickles_data():
    sources = sorted((ROOT / "stylize").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    assert len(sources) > 10
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            for pattern, unless in FORBIDDEN:
                if re.search(pattern, code) and not (unless and re.search(unless, code)):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_weights_file_that_would_run_code_is_refused(folder, how):
    import pickle

    marker = folder / "MARKER"
    weights = folder / "evil.pt"
    payload = {"features.0.weight": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload, protocol=2))  # the protocol torch.load expects
    uri = write(folder, "pairs: [{content: cat.png, style: starry.jpg, settings: {weights: evil.pt}}]\n")
    outcome = JobRunner("cpu").run(next(load_manifest(uri).jobs(Storage())), Storage())
    assert outcome.status == "failed"
    assert outcome.error.startswith(f"refusing to load {weights}: not a plain state dict of tensors")
    assert "weights_only=False" not in outcome.error and "\n" not in outcome.error
    assert not marker.exists()
