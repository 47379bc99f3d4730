"""Manifests: parsing, validation with field paths, and expansion into jobs (local and S3)."""

from __future__ import annotations

import os
import textwrap

import pytest

from stylize.errors import ConfigError, ManifestError
from stylize.catalog.manifest import Job, in_shard, load_manifest, parse_shard, storage_for, validate
from stylize.engine.settings import Settings
from stylize.catalog.storage import Storage


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def project(tmp_path, image_bytes):
    """A local project: images in content/, styles/, photos/ and a manifests/ folder."""
    root = tmp_path / "project"
    files = {
        "content/astronaut.png": image_bytes("png"),
        "content/cat.jpg": image_bytes("jpeg"),
        "styles/starry_night.jpg": image_bytes("jpeg"),
        "styles/shipwreck.jpg": image_bytes("jpeg"),
        "photos/2026/a/IMG_1.jpg": image_bytes("jpeg"),
        "photos/2026/b/IMG_1.JPG": image_bytes("jpeg"),
        "photos/2026/b/IMG_2.webp": image_bytes("webp"),
        "photos/2026/readme.txt": b"not an image",
        "photos/2026/._IMG_1.jpg": b"macOS resource fork",
        "photos/2026/.thumbs/t.jpg": image_bytes("jpeg"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a cwd that is not the manifest's folder: relative paths must not depend on it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# --- expansion, local -------------------------------------------------------


def test_pairs_resolve_against_the_manifest_folder(project, elsewhere):
    uri = write(project / "manifests" / "demo.yaml", """\
        version: 1
        output: ../out/demo
        defaults: {size: 384, iterations: 300}
        pairs:
          - content: ../content/astronaut.png
            style: ../styles/starry_night.jpg
          - content: ../content/cat.jpg
            style: [../styles/starry_night.jpg, ../styles/shipwreck.jpg]
            style_weights: [0.7, 0.3]
            settings: {iterations: 500, preserve_color: true, format: jpeg}
          - content: ../content/cat.jpg
            style: ../styles/shipwreck.jpg
            name: cats/blend-1
    """)
    manifest = load_manifest(os.path.relpath(uri))  # a relative manifest path, from another cwd
    assert manifest.uri == uri and manifest.base == str(project / "manifests")
    assert manifest.output == str(project / "out" / "demo")
    jobs = list(manifest.jobs(Storage()))
    assert [j.name for j in jobs] == ["astronaut__starry_night", "cat__starry_night+shipwreck", "cats/blend-1"]
    assert [j.source for j in jobs] == ["pairs[0]", "pairs[1]", "pairs[2]"]
    assert [j.index for j in jobs] == [0, 1, 2]
    first, second, third = jobs
    assert first.content == str(project / "content" / "astronaut.png")
    assert first.styles == (str(project / "styles" / "starry_night.jpg"),)
    # Settings() < defaults < pair settings.
    assert (first.settings.size, first.settings.iterations, first.settings.preserve_color) == (384, 300, False)
    assert (second.settings.size, second.settings.iterations, second.settings.preserve_color) == (384, 500, True)
    assert second.settings.style_blend == (0.7, 0.3)
    assert first.settings.tv_weight == Settings().tv_weight
    assert first.image_uri == str(project / "out" / "demo" / "astronaut__starry_night.png")
    assert second.image_uri.endswith("/out/demo/cat__starry_night+shipwreck.jpg")
    assert third.metadata_uri == str(project / "out" / "demo" / "cats" / "blend-1.json")


def test_overrides_and_output_from_the_caller(project, elsewhere):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        defaults: {size: 64}
        pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg, settings: {size: 128, format: webp}}]
    """)
    [job] = load_manifest(uri).jobs(Storage(), overrides={"size": 32, "init": "start.png"}, output="results/")
    assert job.settings.size == 32 and job.settings.format == "webp"
    assert job.settings.init == str(elsewhere / "start.png")  # caller paths resolve against the cwd
    assert job.output == str(elsewhere / "results")
    assert job.image_uri == str(elsewhere / "results" / "cat__shipwreck.webp")
    with pytest.raises(ManifestError, match=r"overrides\.sizee: unknown setting; did you mean 'size'"):
        list(load_manifest(uri).jobs(Storage(), overrides={"sizee": 32}))


def test_path_settings_resolve_against_the_manifest(project, elsewhere):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        defaults: {init: styles/shipwreck.jpg, weights: caffe}
        pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg, settings: {init: random}}]
        grid: {contents: [content/astronaut.png], styles: [styles/shipwreck.jpg]}
    """)
    pair, grid = load_manifest(uri).jobs(Storage())
    assert pair.settings.init == "random" and pair.settings.weights == "caffe"
    assert grid.settings.init == str(project / "styles" / "shipwreck.jpg")


def test_grid_over_folders_keeps_subfolders_and_skips_non_images(project, elsewhere):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg}]
        grid:
          contents: [photos/2026/, content/astronaut.png]
          styles: [styles/starry_night.jpg, styles/shipwreck.jpg]
          settings: {size: 512}
    """)
    jobs = list(load_manifest(uri).jobs(Storage()))
    assert [(j.name, j.source, j.index) for j in jobs] == [
        ("cat__shipwreck", "pairs[0]", 0),
        ("a/IMG_1__starry_night", "grid.contents[0]", 1),
        ("a/IMG_1__shipwreck", "grid.contents[0]", 2),
        ("b/IMG_1__starry_night", "grid.contents[0]", 3),
        ("b/IMG_1__shipwreck", "grid.contents[0]", 4),
        ("b/IMG_2__starry_night", "grid.contents[0]", 5),
        ("b/IMG_2__shipwreck", "grid.contents[0]", 6),
        ("astronaut__starry_night", "grid.contents[1]", 7),
        ("astronaut__shipwreck", "grid.contents[1]", 8),
    ]
    assert jobs[3].content == str(project / "photos" / "2026" / "b" / "IMG_1.JPG")
    assert all(j.settings.size == 512 for j in jobs[1:])  # grid settings apply to the grid only
    assert jobs[0].settings.size == Settings().size


@pytest.mark.parametrize(
    "pattern, names",
    [
        ("photos/**/IMG_*.jpg", ["2026/a/IMG_1"]),  # case-sensitive, like a shell
        ("photos/2026/*/IMG_1.*", ["a/IMG_1", "b/IMG_1"]),
        ("photos/**", ["2026/a/IMG_1", "2026/b/IMG_1", "2026/b/IMG_2"]),
        ("photos/2026/[!a]/*", ["b/IMG_1", "b/IMG_2"]),
        ("content/*.png", ["astronaut"]),
    ],
)
def test_grid_globs(project, elsewhere, pattern, names):
    uri = write(project / "m.yaml", f"""\
        version: 1
        output: out
        grid: {{contents: ["{pattern}"], styles: [styles/shipwreck.jpg]}}
    """)
    assert [j.name for j in load_manifest(uri).jobs(Storage())] == [f"{n}__shipwreck" for n in names]


def test_grid_styles_may_be_folders(project, elsewhere):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        grid: {contents: [content/cat.jpg], styles: [styles]}
    """)
    assert [j.name for j in load_manifest(uri).jobs(Storage())] == ["cat__shipwreck", "cat__starry_night"]


def test_manifest_given_as_file_uri(project):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg}]
    """)
    manifest = load_manifest(f"file://{uri}")
    assert manifest.uri == uri and next(manifest.jobs(Storage())).content == str(project / "content" / "cat.jpg")


# --- bad manifests ----------------------------------------------------------

V = "version: 1\noutput: out\n"
PAIR = "pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg}]\n"


@pytest.mark.parametrize(
    "text, path, fragment",
    [
        ("pairs: [\n", "", "not valid YAML"),
        ("- a\n- b\n", "", "expected a mapping"),
        ("", "", "found nothing"),
        ("version: 2\noutput: out\n" + PAIR, "version", "expected 1, found 2"),
        ("output: out\n" + PAIR, "version", "missing"),
        ("version: 1\n" + PAIR, "output", "missing"),
        (V + PAIR + "colour: red\n", "colour", "unknown key"),
        (V + "pairs: [{content: a.png, style: s.jpg, colour: red}]\n", "pairs[0].colour", "unknown key"),
        (V + "pairs: [{style: s.jpg}]\n", "pairs[0].content", "missing"),
        (V + "pairs: [{content: a.png, style: []}]\n", "pairs[0].style", "empty list"),
        (V + "defaults: {style_blend: [1, 2]}\n" + PAIR, "defaults.style_blend", "1 style images"),
        (V + "defaults: {iterations: -5}\n" + PAIR, "defaults.iterations", "greater than or equal to 0"),
        (V + "defaults: {iteration: 5}\n" + PAIR, "defaults.iteration", "did you mean 'iterations'"),
        (V + "defaults: {size: 100, max_pixels: 256}\n" + PAIR, "defaults", "budget max_pixels"),
        (V + "grid: {contents: [a.png], styles: [s.jpg], settings: {size: 1}}\n", "grid.settings.size", "greater than or equal to 16"),
        (V + "grid: {contents: [], styles: [s.jpg]}\n", "grid.contents", "empty list"),
        (V + "grid: {contents: [a.png], styles: [s.jpg], style: x}\n", "grid.style", "did you mean 'styles'"),
        (V + "pairs: {content: a.png}\n", "pairs", "expected a list"),
        (V + "pairs: [a.png]\n", "pairs[0]", "expected a mapping"),
        (V + "grid: [a.png]\n", "grid", "expected a mapping"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: ../x}]\n", "pairs[0].name", "escape the output folder"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: /abs/x}]\n", "pairs[0].name", "is absolute"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: 's3://other-bucket/x'}]\n", "pairs[0].name", "is a URI"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: 'a/../../x'}]\n", "pairs[0].name", "escape the output folder"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: 'a\\\\b'}]\n", "pairs[0].name", "backslash"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: ''}]\n", "pairs[0].name", "is empty"),
        (V + "pairs: [{content: a.png, style: s.jpg, name: \"a\\0b\"}]\n", "pairs[0].name", "NUL"),
        (V, "", "no jobs"),
        (V + "pairs: []\n", "", "`pairs` is an empty list"),
        (V + "pairs: !!python/object/apply:os.system [echo hi]\n", "", "constructor for the tag"),
        (V + "version: 1\n" + PAIR, "", "duplicate key 'version'"),
        # Found only when expanding: listing folders and globs.
        (V + "grid: {contents: [empty/], styles: [s.jpg]}\n", "grid.contents[0]", "matched no images"),
        (V + "grid: {contents: ['content/*.gif'], styles: [s.jpg]}\n", "grid.contents[0]", "matched no images"),
        (V + "grid: {contents: [missing/], styles: [s.jpg]}\n", "grid.contents[0]", "no such folder"),
    ],
)
def test_bad_manifests(project, elsewhere, text, path, fragment):
    (project / "empty").mkdir(exist_ok=True)
    uri = str(project / "bad.yaml")
    (project / "bad.yaml").write_text(text)
    with pytest.raises(ManifestError) as info:
        list(load_manifest(uri).jobs(Storage()))
    error = info.value
    assert error.source == uri
    assert any(p == path and fragment in m for p, m in error.problems), error.problems
    assert str(error).startswith(f"{uri}: ") and fragment in str(error)
    if path:
        assert f"{path}: " in str(error)
    # validate() reports the same problem instead of raising.
    count, problems = validate(uri, check_inputs=False)
    assert any(p == path and fragment in m for p, m in problems), problems


@pytest.mark.parametrize(
    "pair, path, fragment",
    [
        ("{content: a.png, style: [s.jpg, t.jpg], style_weights: [1]}", "pairs[1].style_weights", "expected 2 weights"),
        ("{content: a.png, style: [s.jpg, t.jpg], style_weights: [1, -1]}", "pairs[1].style_weights", ">= 0"),
        ("{content: a.png, style: [s.jpg, t.jpg], style_weights: [.nan, 1]}", "pairs[1].style_weights[0]", "finite number"),
        ("{content: a.png, style: s.jpg, settings: {iterations: -5}}", "pairs[1].settings.iterations", "greater than or equal to 0"),
        ("{content: a.png, style: s.jpg, settings: {style_weight: .inf}}", "pairs[1].settings.style_weight", "finite number"),
        ("{content: a.png, style: s.jpg, settings: {size: 20000}}", "pairs[1].settings", "use size <= 4096"),
    ],
)
def test_a_pair_with_invalid_settings_is_a_refused_job(project, elsewhere, pair, path, fragment):
    # The batch goes on: the other pair is a normal job, this one fails when run.
    uri = write(project / "m.yaml", f"version: 1\noutput: out\npairs: [{{content: b.png, style: s.jpg}}, {pair}]\n")
    good, refused = load_manifest(uri).jobs(Storage())
    assert good.problem is None and good.settings is not None
    assert refused.settings is None and refused.source == "pairs[1]"
    assert refused.problem.startswith(f"{path}: ") and fragment in refused.problem
    # validate() still reports it with its field path.
    count, problems = validate(uri, check_inputs=False)
    assert any(p == path and fragment in m for p, m in problems), problems


def test_all_problems_are_listed_at_once(tmp_path):
    uri = write(tmp_path / "m.yaml", """\
        version: 1
        output: out
        defaults: {size: 3}
        pairs:
          - {content: a.png, style: []}
          - {content: b.png, style: s.jpg, settings: {iterations: -1, tv_weight: -1}}
          - {style: s.jpg, name: ../up}
        grid: {contents: [x/], styles: [s.jpg], settings: {scales: 0}}
    """)
    with pytest.raises(ManifestError) as info:
        load_manifest(uri)
    paths = [p for p, _ in info.value.problems]
    # pairs[1]'s own settings would only refuse that job, so loading leaves them out ...
    assert paths == ["pairs[0].style", "pairs[2].content", "defaults.size", "grid.settings.scales"]
    assert "4 problems" in str(info.value)
    # ... and validate() lists everything.
    assert [p for p, _ in validate(uri, check_inputs=False)[1]] == [
        "pairs[0].style", "pairs[2].content", "defaults.size",
        "pairs[1].settings.iterations", "pairs[1].settings.tv_weight", "grid.settings.scales",
    ]


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.yaml: 1 problem: cannot read the manifest: no such file"):
        load_manifest(str(tmp_path / "nope.yaml"))


def test_validate_checks_inputs_exist(project, elsewhere):
    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        pairs:
          - {content: content/cat.jpg, style: [styles/shipwreck.jpg, styles/missing.jpg]}
          - {content: content/missing.png, style: styles/shipwreck.jpg}
        grid: {contents: [photos/2026/a/], styles: [styles/gone.jpg]}
    """)
    count, problems = validate(uri)
    assert count == 3
    assert problems == [
        ("pairs[0].style[1]", f"{project}/styles/missing.jpg: not found"),
        ("pairs[1].content", f"{project}/content/missing.png: not found"),
        ("grid.styles[0]", f"{project}/styles/gone.jpg: not found"),
    ]
    assert validate(uri, check_inputs=False) == (3, [])


# --- sharding ---------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("2/4", (2, 4)), (" 3 / 8 ", (3, 8))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["", "1", "4/4", "1/0", "-1/2", "a/b", "1/2/3"])
def test_parse_shard_rejects(text):
    with pytest.raises(ConfigError, match="expected"):
        parse_shard(text)


def test_shards_partition_the_jobs():
    jobs = [Job(name=f"j{i}", content="c", styles=("s",), settings=Settings(), output="o", source="pairs[0]", index=i) for i in range(10)]
    shards = [[j.index for j in jobs if in_shard(j, (i, 3))] for i in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(in_shard(j, None) for j in jobs)


# --- S3 ---------------------------------------------------------------------


def test_manifest_and_images_on_s3(s3_server, s3, bucket, image_bytes):
    storage = Storage(endpoint_url=s3_server)
    for key in ["proj/content/cat.jpg", "proj/styles/starry_night.jpg", "proj/styles/shipwreck.jpg"]:
        s3.put_object(Bucket=bucket, Key=key, Body=image_bytes("jpeg"))
    storage.write(f"s3://{bucket}/proj/manifests/m.yaml", textwrap.dedent(f"""\
        version: 1
        output: ../out
        pairs:
          - content: ../content/cat.jpg
            style: [../styles/starry_night.jpg, s3://{bucket}/proj/styles/shipwreck.jpg]
        grid:
          contents: [../content/]
          styles: ['../styles/s*.jpg']
    """).encode())
    manifest = load_manifest(f"s3://{bucket}/proj/manifests/m.yaml", storage)
    assert manifest.base == f"s3://{bucket}/proj/manifests/"
    assert manifest.output == f"s3://{bucket}/proj/out"
    jobs = list(manifest.jobs(storage))
    assert [j.name for j in jobs] == ["cat__starry_night+shipwreck", "cat__shipwreck", "cat__starry_night"]
    assert jobs[0].styles == (f"s3://{bucket}/proj/styles/starry_night.jpg", f"s3://{bucket}/proj/styles/shipwreck.jpg")
    assert jobs[1].image_uri == f"s3://{bucket}/proj/out/cat__shipwreck.png"
    assert jobs[1].metadata_uri == f"s3://{bucket}/proj/out/cat__shipwreck.json"
    assert validate(f"s3://{bucket}/proj/manifests/m.yaml", storage) == (3, [])


def test_s3_manifest_missing(s3_server, bucket):
    storage = Storage(endpoint_url=s3_server)
    with pytest.raises(ManifestError, match=rf"s3://{bucket}/m\.yaml: 1 problem: cannot read the manifest: no such key"):
        load_manifest(f"s3://{bucket}/m.yaml", storage)
    with pytest.raises(ManifestError, match="no such bucket 'no-such-bucket-y2'"):
        load_manifest("s3://no-such-bucket-y2/m.yaml", storage)


def test_grid_over_a_prefix_of_more_than_1000_keys_streams(s3_server, big_prefix, tmp_path):
    bucket, keys = big_prefix
    storage = Storage(endpoint_url=s3_server)
    uri = write(tmp_path / "m.yaml", f"""\
        version: 1
        output: s3://{bucket}/out/
        grid: {{contents: ["s3://{bucket}/catalog"], styles: [starry_night.jpg]}}
    """)
    calls = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    # Given the clashes (the flow finds them in the expansion that counts the jobs), one pass.
    jobs = load_manifest(uri).jobs(storage, clashes={})
    first = next(jobs)
    assert len(calls) == 1  # the second page is not fetched before it is needed
    assert first.name == "a/IMG_0000__starry_night" and first.content == f"s3://{bucket}/catalog/a/IMG_0000.jpg"
    rest = list(jobs)
    assert len(calls) == 2
    assert len(rest) + 1 == 1050  # notes.txt is not an image
    assert rest[-1].name == "b/IMG_0524__starry_night" and rest[-1].index == 1049
    assert rest[-1].image_uri == f"s3://{bucket}/out/b/IMG_0524__starry_night.png"
    assert first.styles == (str(tmp_path / "starry_night.jpg"),)


def test_storage_block_configures_the_inputs(s3_server, s3, bucket, image_bytes, tmp_path):
    s3.put_object(Bucket=bucket, Key="c.png", Body=image_bytes())
    s3.put_object(Bucket=bucket, Key="s.png", Body=image_bytes())
    uri = write(tmp_path / "m.yaml", f"""\
        version: 1
        output: s3://{bucket}/out
        storage: {{endpoint_url: "{s3_server}", region: eu-west-1}}
        pairs: [{{content: "s3://{bucket}/c.png", style: "s3://{bucket}/s.png"}}]
    """)
    manifest = load_manifest(uri)
    storage = storage_for(manifest)
    assert (storage.endpoint_url, storage.region) == (s3_server, "eu-west-1")
    assert validate(uri) == (1, [])  # inputs checked through the manifest's endpoint
    assert storage_for(load_manifest(uri.replace("m.yaml", "m.yaml"))).endpoint_url == s3_server


def test_bad_storage_block(tmp_path):
    uri = write(tmp_path / "m.yaml", """\
        version: 1
        output: out
        storage: {endpoint: http://x}
        pairs: [{content: a.png, style: s.jpg}]
    """)
    with pytest.raises(ManifestError, match=r"storage\.endpoint: unknown key; did you mean 'endpoint_url'"):
        load_manifest(uri)


def test_manifest_objects_pickle(project):
    # Task runners send jobs to worker processes and errors back.
    import pickle

    uri = write(project / "m.yaml", """\
        version: 1
        output: out
        pairs: [{content: content/cat.jpg, style: styles/shipwreck.jpg}]
    """)
    manifest = load_manifest(uri)
    job = next(manifest.jobs(Storage()))
    assert pickle.loads(pickle.dumps(manifest)) == manifest
    assert pickle.loads(pickle.dumps(job)) == job
    error = pickle.loads(pickle.dumps(ManifestError(uri, [("pairs[0]", "bad")])))
    assert (error.source, error.problems, str(error)) == (uri, [("pairs[0]", "bad")], f"{uri}: 1 problem: pairs[0]: bad")
