"""No output replaces an input or a file stylize did not write (issue 17, the write side):
``outputs.claim`` through ``prepare``, ``stylize image`` and ``plan``, local and on the S3 test server;
the write probe; short temporary names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from faults import FaultProxy

from stylize.app.cli import main
from stylize.catalog import metadata
from stylize.catalog.jobs import Prepared, prepare
from stylize.catalog.manifest import Job, load_manifest
from stylize.catalog.outputs import claim
from stylize.catalog.storage import Storage
from stylize.engine.settings import Settings
from stylize.errors import NotFoundError, OverwriteError, StorageError

DATA = Path(__file__).parent / "data"
FAST = ["--size", "32", "--iterations", "2", "--scales", "1", "--precision", "float32"]
FAST_YAML = "{size: 32, iterations: 2, scales: 1, precision: float32}"


@pytest.fixture
def photos(tmp_path):
    """``photos/a.png`` (a photo) and ``s.jpg`` (a painting) in a fresh folder."""
    (tmp_path / "photos").mkdir()
    shutil.copy(DATA / "chelsea.png", tmp_path / "photos" / "a.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "s.jpg")
    return tmp_path


def job_at(output: str, name: str, content: str, style: str, **settings) -> Job:
    return Job(name=name, content=content, styles=(style,), settings=Settings(**settings), output=output,
               source="pairs[0]", index=0)


def image(args: list[str]) -> int:
    return main(["image", *args, *FAST])


# --- stylize image ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["photos/a.png", "photos/./a.png", "photos/../photos/a.png", "link/a.png"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_image_never_replaces_its_content(photos, capsys, monkeypatch, spelling, overwrite):
    monkeypatch.chdir(photos)
    (photos / "link").symlink_to(photos / "photos", target_is_directory=True)
    before = (photos / "photos" / "a.png").read_bytes()
    assert image(["photos/a.png", "s.jpg", "-o", spelling, *overwrite]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the job's content input" in err and "never replaced" in err, err
    assert (photos / "photos" / "a.png").read_bytes() == before
    assert not (photos / "photos" / "a.json").exists()


def test_image_never_replaces_a_style_even_through_a_hard_link(photos, capsys):
    os.link(photos / "s.jpg", photos / "hard.jpg")
    assert image([str(photos / "photos" / "a.png"), str(photos / "s.jpg"), "-o", str(photos / "hard.jpg"),
                  "--overwrite"]) == 1
    assert "is the job's style input" in capsys.readouterr().err
    assert (photos / "hard.jpg").read_bytes() == (DATA / "starry_night.jpg").read_bytes()


def test_image_keeps_an_unrelated_json_unless_told(photos, capsys):
    notes = photos / "img" / "notes.json"
    notes.parent.mkdir()
    notes.write_text('{"shopping": ["milk"]}\n')
    args = [str(photos / "photos" / "a.png"), str(photos / "s.jpg"), "-o", str(photos / "img" / "notes.png")]
    assert image(args) == 1
    err = capsys.readouterr().err
    assert f"{notes} exists and is not stylize metadata" in err and "--overwrite" in err, err
    assert notes.read_text() == '{"shopping": ["milk"]}\n' and not (photos / "img" / "notes.png").exists()

    assert image([*args, "--overwrite"]) == 0
    assert json.loads(notes.read_text())["schema"] == metadata.SCHEMA
    assert image(args) == 0, "stylize wrote both now: a second run replaces them without --overwrite"


def test_image_keeps_an_unrelated_image_unless_told(photos, capsys):
    out = photos / "holiday.png"
    shutil.copy(DATA / "astronaut.png", out)
    args = [str(photos / "photos" / "a.png"), str(photos / "s.jpg"), "-o", str(out)]
    assert image(args) == 1
    assert "holiday.png exists and has no stylize metadata naming it" in capsys.readouterr().err
    assert out.read_bytes() == (DATA / "astronaut.png").read_bytes()
    assert image([*args, "--overwrite"]) == 0 and out.read_bytes() != (DATA / "astronaut.png").read_bytes()


def test_a_sidecar_naming_another_image_does_not_claim_this_one(photos, capsys):
    args = [str(photos / "photos" / "a.png"), str(photos / "s.jpg"), "-o"]
    assert image([*args, str(photos / "r.png")]) == 0  # r.json names r.png
    shutil.copy(DATA / "astronaut.png", photos / "r.jpg")
    assert image([*args, str(photos / "r.jpg")]) == 1
    assert "r.jpg exists and has no stylize metadata naming it" in capsys.readouterr().err


def test_a_240_character_output_name_is_written(photos):
    name = "n" * 240  # 244 bytes with ".png": the old temporary name (".NAME.<12 hex>.tmp") passed 255
    assert image([str(photos / "photos" / "a.png"), str(photos / "s.jpg"), "-o", str(photos / f"{name}.png")]) == 0
    meta = json.loads((photos / f"{name}.json").read_text())
    assert metadata.image_matches(Storage(), str(photos / f"{name}.png"), meta["output"])
    assert sorted(p.name for p in photos.iterdir()) == sorted(["photos", "s.jpg", f"{name}.png", f"{name}.json"])


# --- catalogs: prepare refuses the job before reading anything ----------------------------------------


def manifest(folder: Path, body: str) -> str:
    path = folder / "manifest.yaml"
    path.write_text(f"version: 1\ndefaults: {FAST_YAML}\n{body}")
    return str(path)


@pytest.mark.parametrize("output", ["photos", "./photos", "other/../photos"])
def test_a_pair_whose_output_is_its_content_fails_alone(photos, output, capsys):
    uri = manifest(photos, f"output: {output}\npairs:\n  - {{content: photos/a.png, style: s.jpg, name: a}}\n"
                           f"  - {{content: photos/a.png, style: s.jpg, name: b}}\n")
    refused, fine = load_manifest(uri).jobs(Storage())
    outcome = prepare(refused, Storage())
    assert outcome.status == "failed" and outcome.kind == "OverwriteError"
    assert outcome.error.startswith("pairs[0]: output image ") and "content input" in outcome.error
    assert isinstance(prepare(fine, Storage()), Prepared)
    assert main(["plan", uri]) == 0  # plan says so too, before any run
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("error a  pairs[0]: output image ") and lines[1].startswith("run   b  ")
    assert main(["validate", uri]) == 2  # and validate, naming the pair
    err = capsys.readouterr().err
    assert "1 problem" in err and "  pairs[0]: output image " in err and "content input" in err, err


def test_snapshots_and_metadata_never_land_on_inputs(photos):
    shutil.copy(DATA / "chelsea.png", photos / "photos" / "a.iter00002.png")
    job = job_at(str(photos / "photos"), "a", str(photos / "photos" / "a.iter00002.png"), str(photos / "s.jpg"),
                 save_every=2, iterations=4)
    with pytest.raises(OverwriteError, match=r"output snapshot .*a\.iter00002\.png is the job's content"):
        claim(job, Storage())
    job = job_at(str(photos), "s", str(photos / "photos" / "a.png"), str(photos / "s.json"))
    with pytest.raises(OverwriteError, match=r"output metadata .*s\.json is the job's style input"):
        claim(job, Storage(), overwrite=True)


def test_an_existing_snapshot_stylize_did_not_write_is_kept(photos):
    (photos / "out").mkdir()
    shutil.copy(DATA / "astronaut.png", photos / "out" / "a.iter00004.png")
    job = job_at(str(photos / "out"), "a", str(photos / "photos" / "a.png"), str(photos / "s.jpg"),
                 save_every=2, iterations=4)
    with pytest.raises(OverwriteError, match=r"a\.iter00004\.png exists and has no stylize metadata"):
        claim(job, Storage())


def test_a_pending_sidecar_claims_the_image_a_crash_left(photos):
    job = job_at(str(photos / "out"), "a", str(photos / "photos" / "a.png"), str(photos / "s.jpg"))
    storage = Storage()
    storage.write(job.image_uri, b"half a job")  # the process died after the image, before the metadata
    with pytest.raises(OverwriteError):
        claim(job, storage)
    storage.write(job.metadata_uri, metadata.encode(metadata.pending_metadata(job.name, job.image_uri)))
    assert claim(job, storage)["pending"] is True


def test_s3_outputs_over_inputs_and_foreign_objects_are_refused(s3_server, s3, bucket):
    storage = Storage(endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="photos/a.png", Body=(DATA / "chelsea.png").read_bytes())
    s3.put_object(Bucket=bucket, Key="s.jpg", Body=(DATA / "starry_night.jpg").read_bytes())
    content, style = f"s3://{bucket}/photos/a.png", f"s3://{bucket}/s.jpg"
    with pytest.raises(OverwriteError, match="is the job's content input"):
        claim(job_at(f"s3://{bucket}/photos", "a", content, style), storage, overwrite=True)

    s3.put_object(Bucket=bucket, Key="out/b.json", Body=b"not ours")
    job = job_at(f"s3://{bucket}/out", "b", content, style)
    with pytest.raises(OverwriteError, match=f"s3://{bucket}/out/b.json exists and is not stylize metadata"):
        claim(job, storage)
    s3.delete_object(Bucket=bucket, Key="out/b.json")
    s3.put_object(Bucket=bucket, Key="out/b.png", Body=b"someone's picture")
    outcome = prepare(job, storage)
    assert outcome.status == "failed" and "b.png exists and has no stylize metadata naming it" in outcome.error
    assert s3.get_object(Bucket=bucket, Key="out/b.png")["Body"].read() == b"someone's picture"


# --- the write probe ----------------------------------------------------------------------------------


def test_probe_leaves_nothing_behind(tmp_path, s3_server, bucket, s3):
    Storage().probe(str(tmp_path / "new" / "deeper"))
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone too
    Storage(endpoint_url=s3_server).probe(f"s3://{bucket}/out")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_probe_names_the_output_and_the_reason(tmp_path, s3_server):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StorageError, match=r"^output .*/file/out: cannot be written: .*a file stands where a folder"):
        Storage().probe(str(tmp_path / "file" / "out"))
    with pytest.raises(NotFoundError, match=r"^output s3://no-such-bucket-w17/out: cannot be written: no such bucket"):
        Storage(endpoint_url=s3_server).probe("s3://no-such-bucket-w17/out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_probe_refuses_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(StorageError, match=r"output .*/ro: cannot be written: .*Permission denied"):
        Storage().probe(str(tmp_path / "ro"))


def test_probe_refuses_a_bucket_that_denies_writes(s3_server, bucket):
    with FaultProxy(s3_server, kinds=("403",), methods=("PUT",)) as proxy:
        with pytest.raises(StorageError, match=r"output s3://.*/out: cannot be written: access denied"):
            Storage(endpoint_url=proxy.url).probe(f"s3://{bucket}/out")


@pytest.mark.parametrize("where", ["file", "bucket"])
def test_run_validate_and_plan_report_an_output_that_cannot_be_written(photos, capsys, s3_server, monkeypatch,
                                                                       where):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    (photos / "taken").write_text("a file where the output folder should be")
    output = photos / "taken" if where == "file" else "s3://no-such-bucket-w17/out"
    uri = manifest(photos, f"output: {output}\npairs: [{{content: photos/a.png, style: s.jpg, name: a}}]\n")
    assert main(["run", uri]) == 1  # before Prefect starts and before any job
    err = capsys.readouterr().err
    assert err.startswith(f"stylize: error: output {output}: cannot be written: ") and err.count("\n") == 1, err
    assert main(["validate", uri]) == 2
    assert f"output: output {output}: cannot be written" in capsys.readouterr().err
    assert main(["plan", uri]) == 0
    assert f"error output  output {output}: cannot be written" in capsys.readouterr().out


def test_image_on_s3_never_replaces_its_content_and_keeps_foreign_objects(s3_server, s3, bucket, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    photo = (DATA / "chelsea.png").read_bytes()
    s3.put_object(Bucket=bucket, Key="photos/a.png", Body=photo)
    s3.put_object(Bucket=bucket, Key="s.jpg", Body=(DATA / "starry_night.jpg").read_bytes())
    s3.put_object(Bucket=bucket, Key="out/notes.json", Body=b'{"shopping": ["milk"]}')
    args = [f"s3://{bucket}/photos/a.png", f"s3://{bucket}/s.jpg", "-o"]
    # S3 keys are verbatim ("photos/./a.png" is another object), so only the same key is the input.
    assert image([*args, f"s3://{bucket}/photos/a.png", "--overwrite"]) == 1
    assert "is the job's content input" in capsys.readouterr().err
    assert s3.get_object(Bucket=bucket, Key="photos/a.png")["Body"].read() == photo
    assert image([*args, f"s3://{bucket}/out/notes.png"]) == 1
    assert "out/notes.json exists and is not stylize metadata" in capsys.readouterr().err
    assert image([*args, f"s3://{bucket}/out/notes.png", "--overwrite"]) == 0
    meta = json.loads(s3.get_object(Bucket=bucket, Key="out/notes.json")["Body"].read())
    assert metadata.image_matches(Storage(), f"s3://{bucket}/out/notes.png", meta["output"])


def test_a_240_character_name_is_written_on_s3(s3_server, s3, bucket):
    uri = f"s3://{bucket}/out/{'n' * 240}.png"
    info = Storage(endpoint_url=s3_server).write(uri, b"picture")
    assert info.etag == s3.head_object(Bucket=bucket, Key=f"out/{'n' * 240}.png")["ETag"].strip('"')


def test_probe_passes_when_only_its_delete_is_refused(s3_server, bucket, caplog):
    # A run never deletes (a pending document replaces stale metadata): write-only access is enough.
    with FaultProxy(s3_server, kinds=("403",), methods=("DELETE",)) as proxy:
        Storage(endpoint_url=proxy.url, max_attempts=0).probe(f"s3://{bucket}/out")
    assert [kind for kind, _, _ in proxy.faults] == ["403"]
    assert "the write probe s3://" in caplog.text and "was left behind" in caplog.text
