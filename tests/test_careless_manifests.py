"""Careless and hostile manifests (issue 17, the manifest side): a manifest read from S3 stays on S3
unless the operator allows local folders, no output root lies where a grid lists its photos, a name
clash fails only its own jobs, and every malformed value is a one-line field error, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stylize.app.cli import main
from stylize.catalog.manifest import load_manifest, parse_manifest, validate
from stylize.catalog.storage import Storage
from stylize.errors import ManifestError, WeightsError

FAST = "{size: 32, iterations: 2, scales: 1, precision: float32}"
PAIR = "pairs: [{content: a.png, style: s.jpg}]\n"


@pytest.fixture
def folder(tmp_path, image_bytes):
    """Photos a.png, photos/{a.jpg,a.png,b.png}, style s.jpg."""
    for rel in ("a.png", "photos/a.jpg", "photos/a.png", "photos/b.png", "s.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(image_bytes(rel.rsplit(".", 1)[1], size=(32, 24)))
    return tmp_path


def write(folder: Path, body: str, name: str = "m.yaml") -> str:
    path = folder / name
    defaults = "" if "\ndefaults:" in f"\n{body}" else f"defaults: {FAST}\n"
    path.write_text(f"version: 1\n{defaults}{body}")
    return str(path)


def problems_of(uri: str, **kwargs) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        list(load_manifest(uri, **kwargs).jobs(Storage()))
    return info.value.problems


# --- confinement -------------------------------------------------------------------------------

S3_BASE = "s3://bucket/manifests/m.yaml"
S3_PAIR = "pairs: [{content: s3://bucket/a.png, style: s3://bucket/s.jpg}]\n"


@pytest.mark.parametrize(
    "body, path",
    [
        ("output: /tmp/out\n" + S3_PAIR, "output"),
        ("output: ~/out\n" + S3_PAIR, "output"),
        ("output: file:///tmp/out\n" + S3_PAIR, "output"),
        ("output: out\npairs: [{content: /etc/photo.jpg, style: s3://bucket/s.jpg}]\n", "pairs[0].content"),
        ("output: out\npairs: [{content: a.png, style: [s.jpg, /home/x/s.jpg]}]\n", "pairs[0].style[1]"),
        ("output: out\npairs: [{content: a.png, style: s.jpg, settings: {init: /etc/i.png}}]\n",
         "pairs[0].settings.init"),
        ("output: out\ngrid: {contents: [/srv/photos/], styles: [s.jpg]}\n", "grid.contents[0]"),
        ("output: out\ngrid: {contents: ['/srv/photos/*.jpg'], styles: [s.jpg]}\n", "grid.contents[0]"),
        ("output: out\ngrid: {contents: [p/], styles: [/srv/s.jpg]}\n", "grid.styles[0]"),
        ("output: out\ngrid: {contents: [p/], styles: [s.jpg], settings: {weights: w.pth}}\n", "grid.settings.weights"),
        ("output: out\ndefaults: {weights: /models/vgg.pth}\n" + S3_PAIR, "defaults.weights"),
    ],
)
def test_a_manifest_from_s3_may_name_only_s3_uris(body, path):
    text = "version: 1\n" + body
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, S3_BASE)
    [(where, message)] = [p for p in info.value.problems if "may name only s3://" in p[1]]
    assert where == path and "--allow-local" in message
    # The same document read from a local folder keeps today's freedom.
    parse_manifest(text, "/srv/manifests/m.yaml")


def test_relative_paths_of_an_s3_manifest_stay_in_its_bucket():
    doc = parse_manifest("version: 1\noutput: ../out\npairs: [{content: ./a.png, style: ../s.jpg}]\n", S3_BASE)
    assert doc.output == "s3://bucket/out"
    with pytest.raises(ManifestError, match=r"pairs\[0\].content: .*climbs above the bucket root"):
        parse_manifest("version: 1\noutput: out\npairs: [{content: ../../a.png, style: s.jpg}]\n", S3_BASE)


def test_allow_local_admits_only_what_resolves_below_the_allowed_folders(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    (allowed / "sub").mkdir(parents=True)
    other.mkdir()
    (allowed / "escape").symlink_to(other, target_is_directory=True)

    def check(content: str) -> list[tuple[str, str]]:
        try:
            parse_manifest(f"version: 1\noutput: s3://b/out\npairs: [{{content: '{content}', style: s3://b/s.jpg}}]\n",
                           S3_BASE, allow_local=[str(allowed / "sub" / "..")])
        except ManifestError as exc:
            return exc.problems
        return []

    assert check(f"{allowed}/sub/a.png") == []
    assert check(f"{allowed}/./a.png") == []
    for outside in (f"{other}/a.png", f"{allowed}/../other/a.png", f"{allowed}/escape/a.png", f"{allowed}2/a.png"):
        [(path, message)] = check(outside)
        assert path == "pairs[0].content" and "outside the allowed local folders" in message, outside


def test_cli_allow_local_on_an_s3_manifest(s3_server, s3, bucket, folder, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3.put_object(Bucket=bucket, Key="s.jpg", Body=(folder / "s.jpg").read_bytes())
    s3.put_object(Bucket=bucket, Key="m.yaml", Body=(
        f"version: 1\noutput: out\ndefaults: {FAST}\n"
        f"pairs: [{{content: '{folder}/a.png', style: s.jpg}}]\n").encode())
    uri = f"s3://{bucket}/m.yaml"
    assert main(["validate", uri]) == 2
    err = capsys.readouterr().err
    assert "pairs[0].content:" in err and "may name only s3:// URIs" in err
    assert main(["plan", uri]) == 2
    assert "pairs[0].content:" in capsys.readouterr().err
    assert main(["validate", uri, "--allow-local", str(folder / "photos"), "--allow-local", str(folder)]) == 0
    assert "1 job(s)" in capsys.readouterr().out
    assert main(["plan", uri, "--allow-local", str(folder)]) == 0
    assert f"run   a__s  s3://{bucket}/out/a__s.png" in capsys.readouterr().out


class _Listener:
    """A TCP port that records whether anything connected to it (a would-be S3 endpoint)."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_an_s3_manifest_cannot_send_requests_to_another_endpoint(s3_server, s3, bucket, capsys, monkeypatch):
    # Another host would get the worker's signed requests, replayable against the real
    # service for any bucket and key the manifest names.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    elsewhere = _Listener()
    try:
        body = (f"version: 1\noutput: s3://{bucket}/out\ndefaults: {FAST}\n"
                f"storage: {{endpoint_url: '{elsewhere.url}', max_attempts: 0}}\n"
                f"pairs: [{{content: s3://private/secret.png, style: s3://{bucket}/s.jpg}}]\n")
        s3.put_object(Bucket=bucket, Key="m.yaml", Body=body.encode())
        uri = f"s3://{bucket}/m.yaml"
        with pytest.raises(ManifestError) as caught:
            load_manifest(uri)
        assert caught.value.problems[0][0] == "storage.endpoint_url"
        assert "not the endpoint this manifest was read from" in caught.value.problems[0][1]
        assert main(["validate", uri]) == 2
        assert "storage.endpoint_url:" in capsys.readouterr().err
        assert main(["plan", uri]) == 2
        assert main(["run", uri]) != 0
        assert elsewhere.connections == 0
        # The endpoint it was read from is fine, written with or without a trailing slash.
        s3.put_object(Bucket=bucket, Key="m.yaml", Body=body.replace(elsewhere.url, s3_server + "/").encode())
        assert load_manifest(uri).storage.endpoint_url == s3_server + "/"
    finally:
        elsewhere.close()


def test_watch_and_lambda_runs_allow_no_local_path():
    from flows.catalog import stylize_catalog
    from stylize.catalog.events import RunRequest

    assert "allow_local" not in RunRequest(manifest="s3://b/m.yaml", idempotency_key="k", reason="r").parameters
    assert stylize_catalog.parameters.properties["allow_local"]["default"] is None


# --- outputs never feed the next run -----------------------------------------------------------


@pytest.mark.parametrize(
    "contents, output",
    [
        ("[photos/]", "photos/styled"),
        ("[photos]", "photos"),
        ("['./']", "out"),
        ("[s.jpg, 'photos/*.png']", "photos/x"),
        ("['**/*.png']", "anywhere"),
    ],
)
def test_an_output_under_a_grid_content_folder_is_refused(folder, contents, output):
    uri = write(folder, f"output: {output}\ngrid: {{contents: {contents}, styles: [s.jpg]}}\n")
    [(path, message)] = problems_of(uri)
    assert path == "output" and "grid.contents[" in message and "stylize the outputs" in message
    assert any(p == "output" for p, _ in validate(uri)[1])


def test_the_comparison_resolves_links(folder):
    (folder / "mirror").symlink_to(folder / "photos", target_is_directory=True)
    uri = write(folder, "output: mirror/out\ngrid: {contents: [photos/], styles: [s.jpg]}\n")
    assert problems_of(uri)[0][0] == "output"


def test_an_output_beside_the_content_folder_is_fine(folder):
    uri = write(folder, "output: photos2\ngrid: {contents: [photos/], styles: [s.jpg]}\n")
    assert len(list(load_manifest(uri).jobs(Storage()))) == 3  # 'photos2' is not in 'photos'
    uri = write(folder, "output: photos/out\ngrid: {contents: [photos/b.png, a.png], styles: [s.jpg]}\n")
    assert validate(uri) == (2, [])  # named files list nothing


def test_an_output_given_by_the_caller_is_checked_too(folder, capsys):
    uri = write(folder, "output: out\ngrid: {contents: [photos/], styles: [s.jpg]}\n")
    with pytest.raises(ManifestError, match=r"--output: .*grid.contents\[0\]"):
        list(load_manifest(uri).jobs(Storage(), output=str(folder / "photos" / "x")))
    assert main(["plan", uri, "--output", str(folder / "photos" / "styled")]) == 2
    assert "--output: the output" in capsys.readouterr().err


def test_an_s3_output_under_a_grid_prefix_is_refused():
    body = "version: 1\noutput: s3://b/photos/styled\ngrid: {contents: [s3://b/photos], styles: [s3://b/s.jpg]}\n"
    with pytest.raises(ManifestError, match=r"output: the output s3://b/photos/styled \(output\) lies in s3://b/photos"):
        parse_manifest(body, S3_BASE)
    parse_manifest(body.replace("styled", "styled").replace("output: s3://b/photos/", "output: s3://b/photos2/"),
                   S3_BASE)
    with pytest.raises(ManifestError, match="grid.contents"):  # the whole bucket
        parse_manifest(body.replace("[s3://b/photos]", "['s3://b/']"), S3_BASE)


# --- name clashes fail only their jobs ---------------------------------------------------------


def test_a_name_clash_fails_both_jobs_and_the_rest_runs(folder):
    uri = write(folder, "output: out\ngrid: {contents: [photos/], styles: [s.jpg]}\n")
    jobs = list(load_manifest(uri).jobs(Storage()))
    assert [(j.name, j.problem is None) for j in jobs] == [("a__s", False), ("a__s", False), ("b__s", True)]
    for job in jobs[:2]:
        assert f"{folder}/photos/a.jpg" in job.problem and f"{folder}/photos/a.png" in job.problem
        assert "produced twice" in job.problem
    # validate still says so, with the field path (exit 2 before anything runs).
    [(path, message)] = validate(uri)[1]
    assert path == "grid.contents[0]" and "a.jpg" in message and "a.png" in message


def test_pairs_that_clash_fail_alone(folder):
    uri = write(folder, "output: out\npairs: [{content: a.png, style: s.jpg, name: x}, "
                        "{content: photos/b.png, style: s.jpg}, {content: photos/a.png, style: s.jpg, name: x}]\n")
    jobs = list(load_manifest(uri).jobs(Storage()))
    assert [j.problem is None for j in jobs] == [False, True, False]
    assert "by pairs[0]" in jobs[0].problem and "by pairs[2]" in jobs[0].problem
    assert jobs[0].problem == jobs[2].problem


def test_survey_counts_and_finds_clashes_once(folder):
    doc = load_manifest(write(folder, "output: out\ngrid: {contents: [photos/], styles: [s.jpg]}\n"))
    count, clashes = doc.survey(Storage())
    assert count == 3 and list(clashes) == ["a__s"] and len(clashes["a__s"]) == 2
    assert doc.survey(Storage(), shard=(1, 2))[0] == 1


def test_s3_keys_with_double_slashes_clash_with_their_plain_twin(s3_server, s3, bucket, image_bytes):
    for key in ("photos/x//y.png", "photos/x/y.png", "photos/z//w.png", "photos/v.png", "s.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=image_bytes("png"))
    storage = Storage(endpoint_url=s3_server)
    doc = parse_manifest(f"version: 1\noutput: out\ngrid: {{contents: [photos/], styles: [s.jpg]}}\n",
                         f"s3://{bucket}/m.yaml")
    jobs = {j.content.rsplit("photos/", 1)[1]: j for j in doc.jobs(storage)}
    assert jobs["v.png"].problem is None and jobs["z//w.png"].problem is None
    assert jobs["z//w.png"].name == "z/w__s"
    for key in ("x//y.png", "x/y.png"):
        assert f"s3://{bucket}/photos/x//y.png" in jobs[key].problem
        assert f"s3://{bucket}/photos/x/y.png" in jobs[key].problem


def test_a_listed_file_whose_name_cannot_be_one_fails_alone(folder):
    (folder / "photos" / "evil\x1b[2J.png").write_bytes((folder / "a.png").read_bytes())
    uri = write(folder, "output: out\ngrid: {contents: [photos/b.png, 'photos/e*.png'], styles: [s.jpg]}\n")
    good, bad = load_manifest(uri).jobs(Storage())
    assert good.problem is None
    assert "control character U+001B" in bad.problem and bad.settings is None
    assert any("U+001B" in m for _, m in validate(uri)[1])


# --- field errors, not tracebacks --------------------------------------------------------------


@pytest.mark.parametrize(
    "body, path, fragment",
    [
        ("output: out\nx: " + "[" * 5000 + "]" * 5000 + "\n", "", "nested too deeply"),
        ("output: out\nx: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "", "nested too deeply"),
        ('output: "o\\0ut"\n' + PAIR, "output", "a NUL byte"),
        ('output: out\npairs: [{content: "a\\0.png", style: s.jpg}]\n', "pairs[0].content", "a NUL byte"),
        ('output: out\npairs: [{content: a.png, style: [s.jpg, "t\\0.jpg"]}]\n', "pairs[0].style[1]", "NUL"),
        ('output: out\ngrid: {contents: ["p\\0/"], styles: [s.jpg]}\n', "grid.contents[0]", "NUL"),
        ('output: out\ndefaults: {init: "x\\0.png"}\n' + PAIR, "defaults.init", "NUL"),
        ('output: out\npairs: [{content: a.png, style: s.jpg, name: "a\\eb"}]\n', "pairs[0].name", "U+001B"),
        ('output: out\npairs: [{content: a.png, style: s.jpg, name: "a\\nb"}]\n', "pairs[0].name", "U+000A"),
        ('output: out\npairs: [{content: a.png, style: s.jpg, name: "a\\x9bb"}]\n', "pairs[0].name", "U+009B"),
        ('output: out\ndefaults: {"se\\0ed": 1}\n' + PAIR, "defaults", "NUL"),
        ("output: out\ndefaults: {seed: 1180591620717411303424}\n" + PAIR, "defaults.seed", "less than or equal to"),
        ("output: out\ndefaults: {seed: -1}\n" + PAIR, "defaults.seed", "greater than or equal to 0"),
        ("output: out\ndefaults: {size: 1180591620717411303424}\n" + PAIR, "defaults.size", "less than or equal to 65536"),
        ("output: out\ndefaults: {max_pixels: 1180591620717411303424}\n" + PAIR, "defaults.max_pixels", "less than"),
        ("output: out\ndefaults: {tile: 1180591620717411303424}\n" + PAIR, "defaults.tile", "less than"),
        ("output: out\ndefaults: {save_every: 1180591620717411303424}\n" + PAIR, "defaults.save_every", "less than"),
        ("output: out\ndefaults: {tolerance_window: 1180591620717411303424}\n" + PAIR, "defaults.tolerance_window",
         "less than"),
        ("output: out\nstorage: {max_attempts: 1180591620717411303424}\n" + PAIR, "storage.max_attempts", "less than"),
        ("output: out\nstorage: {read_timeout: 1e300}\n" + PAIR, "storage.read_timeout", "less than"),
    ],
    ids=["deep-lists", "deep-maps", "nul-output", "nul-content", "nul-style", "nul-grid", "nul-init",
         "escape-name", "newline-name", "c1-name", "nul-key", "seed-huge", "seed-negative", "size-huge",
         "max-pixels-huge", "tile-huge", "save-every-huge", "window-huge", "attempts-huge", "timeout-huge"],
)
def test_malformed_values_are_one_line_field_errors(folder, capsys, body, path, fragment):
    uri = write(folder, body)
    assert main(["validate", uri]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error:" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the heading, then one line per problem
    assert re.match(rf"  {re.escape(path + ': ') if path else ''}.*{re.escape(fragment)}", lines[1]), err
    assert "\x00" not in err and "\x1b" not in err and "\x9b" not in err
    for command in ("plan", "run"):  # refused as the run loads it, before Prefect starts
        assert main([command, uri]) == 2
        assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    (b"root:x:0:0:root:/root:/bin/bash\n", "found a file starting b'root'"),
    (b"", "found an empty file"),
    (b"\x89PNG\r\n", "found a file starting b'\\x89PNG'"),
])
def test_a_weights_file_that_is_no_weights_file_is_named(folder, capsys, content, expected):
    from stylize.engine.features import resolve_weights

    weights = folder / "weights.pth"
    weights.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(weights))
    assert str(weights) in str(info.value) and "expected a VGG19 state dict saved with torch.save" in str(info.value)
    assert expected in str(info.value)
    uri = write(folder, f"output: out\npairs: [{{content: a.png, style: s.jpg, settings: {{weights: '{weights}'}}}}]\n")
    assert main(["validate", uri]) == 2
    assert f"pairs[0].settings.weights: weights '{weights}'" in capsys.readouterr().err
    code = main(["image", str(folder / "a.png"), str(folder / "s.jpg"), "-o", str(folder / "o.png"), "--size", "32",
                 "--iterations", "1", "--weights", str(weights)])
    err = capsys.readouterr().err
    assert code in (1, 2) and len(err.strip().splitlines()) == 1 and expected in err


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--workers", str(2**70)), ("--max-in-flight", "0"),
                                         ("--images-per-batch", str(2**70)), ("--max-failures", "-1")])
def test_run_counts_out_of_range_are_usage_errors(folder, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["run", write(folder, "output: out\n" + PAIR), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


# --- terminal output escapes control characters ------------------------------------------------

NASTY = "evil\x1b[2J\x1b]0;owned\x07\nfailed fake: forged line\u202e[bold]"
RAW = ("\x1b", "\x07", "\u202e", "\nfailed fake")


def test_printable_escapes_every_control_character():
    from stylize.app.view import plain, printable

    assert printable("a\x1bb\nc\td\x7f\x9b\u202e\x00") == "a\\x1bb\\nc\\td\\x7f\\x9b\\u202e\\x00"
    assert printable("café/ünïcode 写真.png") == "café/ünïcode 写真.png"
    assert plain("[bold]x") == "\\[bold]x"


def test_plan_prints_names_escaped(folder, capsys):
    (folder / "photos" / f"{NASTY}.png").write_bytes((folder / "a.png").read_bytes())
    uri = write(folder, "output: out\ngrid: {contents: ['photos/b.png', 'photos/e*.png'], styles: [s.jpg]}\n")
    assert main(["plan", uri]) == 0
    out = capsys.readouterr().out
    assert not any(raw in out for raw in RAW), out
    assert "\\x1b[2J" in out and "1 to run, 0 to skip, 1 with errors" in out
    assert main(["validate", uri]) == 2
    err = capsys.readouterr().err
    assert not any(raw in err for raw in RAW) and "\\x1b[2J" in err, err


def test_the_run_table_and_failure_lines_print_names_escaped(capsys):
    from stylize.app.view import ProgressView

    summary = {"manifest": f"/m/{NASTY}.yaml", "output": f"/o/{NASTY}", "summary_uri": f"/o/{NASTY}.json",
               "seconds": 1.0, "counts": {"done": 0, "skipped": 0, "failed": 1, "total": 1},
               "failures": [{"job": NASTY, "error": f"content: /p/{NASTY}.png: not an image", "kind": "InputError"}]}
    ProgressView(enabled=False).print_summary(summary)
    out = capsys.readouterr().out
    assert not any(raw in out for raw in RAW), out
    [line] = [line for line in out.splitlines() if line.startswith("failed ")]
    assert line.count("\\x1b[2J") == 2 and "[bold]" in line  # shown as written, not taken as markup


def test_image_prints_names_escaped(folder, capsys):
    out = folder / f"{NASTY}.png"
    code = main(["image", str(folder / "a.png"), str(folder / "s.jpg"), "-o", str(out), "--size", "32",
                 "--iterations", "1", "--scales", "1", "--precision", "float32"])
    text = capsys.readouterr()
    assert code == 0 and out.exists()
    assert not any(raw in text.out + text.err for raw in RAW) and "\\x1b[2J" in text.out
    code = main(["image", str(folder / f"missing{NASTY}.png"), str(folder / "s.jpg"), "-o", str(folder / "o.png")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "\\x1b[2J" in err


def test_log_lines_reach_the_terminal_escaped(folder):
    import subprocess
    import sys

    uri = write(folder, "output: out\n" + PAIR)
    code = ("import logging, sys; from stylize.app.cli import main; main(['validate', sys.argv[1]]); "
            "logging.getLogger('stylize.watch').warning('message for %s', sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, uri, f"s3://b/photos/{NASTY}.png"], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert "WARNING stylize.watch: message for s3://b/photos/evil\\x1b[2J" in run.stderr, run.stderr
    assert not any(raw in run.stderr for raw in RAW), run.stderr


@pytest.mark.parametrize("flag, value", [("--debounce", "nan"), ("--debounce", "inf"), ("--debounce", "-1"),
                                         ("--max-wait", "1e308"), ("--wait-seconds", "x")])
def test_watch_numbers_out_of_range_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["watch", "--queue-url", "http://127.0.0.1:1/q", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err
