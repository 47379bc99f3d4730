"""The HTML report from metadata files: escaping, pagination, unreadable files, curves, S3.

The flow writing a report at the end of real runs is tested in
tests/flows/test_run_report.py, and the page in a real browser in
tests/test_report_browser.py.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from stylize.app.cli import main
from stylize.catalog import metadata, runs
from stylize.catalog.report import (MAX_POINTS, PAGE_SIZE, build_catalog_report, build_run_report, failure_field,
                                    loss_curve, safe_relative)
from stylize.catalog.storage import Storage
from stylize.catalog.thumbnails import SIDE, encode_thumbnail, output_thumb, write_thumbnails
from stylize.errors import ConfigError

HOSTILE = "<script>alert('x')</script> \"quoted\" & #?%"


def jpeg(color=(200, 100, 50), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def fake_meta(name: str, *, seconds: float = 2.0, iterations: int = 20, thumbs: dict | None = None) -> dict:
    """A job's metadata document as jobs.finish writes it, with made-up numbers."""
    its = list(range(iterations + 1))
    doc = {
        "schema": metadata.SCHEMA, "job": name, "key": "k", "device": "cpu", "seconds": seconds,
        "output": {"uri": f"/somewhere/{name}.png", "size": 1},
        "engine": {"seconds": seconds * 0.9, "sizes": [[32, 24], [64, 48]]},
        "losses": {"iteration": its, "scale": [1 if i < iterations // 2 else 2 for i in its],
                   "total": [1e6 / (i + 1) for i in its], "content": [0.0] + [10.0 + i for i in its[1:]],
                   "style": [9e5 / (i + 1) for i in its], "tv": [50.0] * len(its), "seconds": [0.1 * i for i in its]},
    }
    if thumbs is not None:
        doc["thumbnails"] = thumbs
    return doc


def write_job(storage: Storage, root: str, name: str, **options) -> None:
    thumbs = {"output": output_thumb(name), "content": "_thumbs/_inputs/c0ffee.jpg",
              "styles": ["_thumbs/_inputs/5717e.jpg"]}
    for path in [thumbs["output"], thumbs["content"], *thumbs["styles"]]:
        storage.write(f"{root}/{path}", jpeg())
    storage.write(f"{root}/{name}.json", metadata.encode(fake_meta(name, thumbs=thumbs, **options)))


def write_run(storage: Storage, root: str, run_id: str, rows: list[dict], seconds: float = 100.0) -> None:
    log = runs.JobLog(storage, root, run_id)
    for row in rows:
        log.add(row)
    log.flush()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    files = log.files
    summary = {"schema": runs.RUN_SCHEMA, "flow_run_id": run_id, "manifest": "m.yaml", "output": root,
               "devices": ["cpu", "cpu"], "started": f"2026-12-0{len(run_id) % 9 + 1}T02:00:00+00:00",
               "seconds": seconds, "engine_seconds": 150.0, "counts": dict(counts, total=len(rows)),
               "failures": [{"job": r["job"], "error": r["error"], "kind": r.get("kind")}
                            for r in rows if r["status"] == "failed"], "job_log_files": files}
    storage.write(runs.summary_uri(root, run_id), json.dumps(summary).encode())


class Links(HTMLParser):
    """Every href and src of a page, and whether any script or event handler is in it."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.cards: list[tuple[str, str]] = []  # (class, id) of each job card

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" or any(name.startswith("on") for name in attrs):
            self.scripts.append(f"{tag} {attrs}")
        self.links += [attrs[a] for a in ("href", "src") if a in attrs]
        if tag == "article":
            self.cards.append((attrs["class"], attrs["id"]))


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text())
    return parser


def test_hostile_names_and_messages_are_escaped_and_links_stay_below_the_root(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    write_job(storage, root, HOSTILE)
    # A metadata file that claims thumbnails outside the root, and a name that climbs.
    evil = fake_meta("../../etc/passwd", thumbs={"output": "../../../secret.jpg", "content": "javascript:alert(1)",
                                                  "styles": ["/etc/x.jpg", "s3://other/x.jpg"]})
    storage.write(f"{root}/evil.json", metadata.encode(evil))
    rows = [{"job": HOSTILE, "status": "done", "seconds": 2.0},
            {"job": "../../etc/passwd", "status": "done", "seconds": 1.0},
            {"job": "bad<img src=x onerror=alert(1)>", "status": "failed", "kind": "InputError",
             "error": "pairs[0].content: <img src=x onerror=alert(1)> is not an image; '\"</td></table>"}]
    write_run(storage, root, "run-1", rows)

    report = build_run_report(storage, root, "run-1")
    page = Path(report.uri)
    html = page.read_text()
    parsed = parse(page)
    assert parsed.scripts == []
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt; is not an image; &#39;&#34;&lt;/td&gt;&lt;/table&gt;" in html
    for link in parsed.links:
        assert not re.match(r"[a-z]+:", link), link  # relative only: no javascript:, file:, s3:
        below = link.removeprefix("../")  # the page is in _runs/, one folder below the root
        assert ".." not in below.split("/") and not below.startswith("/"), link
    # The hostile job's thumbnail is linked percent-encoded, and that is the file the job wrote.
    encoded = "../_thumbs/%3Cscript%3Ealert%28%27x%27%29%3C/script%3E%20%22quoted%22%20%26%20%23%3F%25.jpg"
    assert encoded in parsed.links
    assert (tmp_path / "out" / "_thumbs" / "<script>alert('x')</script> \"quoted\" & #?%.jpg").is_file()
    assert "Content-Security-Policy" in html and "script-src" not in html  # default-src 'none' forbids scripts


def test_run_report_lists_every_job_with_the_counts_and_groups_failures(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    for name in ("a", "b"):
        write_job(storage, root, name, seconds=3.0 if name == "a" else 40.0)
    rows = [{"job": "a", "status": "done", "seconds": 3.0}, {"job": "b", "status": "skipped", "seconds": 0.01},
            {"job": "c", "status": "failed", "kind": "InputError", "error": "pairs[2].content: not an image"},
            {"job": "d", "status": "failed", "kind": "StorageError", "error": "s3://b/x.jpg: access denied"},
            {"job": "e", "status": "failed", "kind": "InputError", "error": "grid.contents[0].content: too small"}]
    write_run(storage, root, "r1", rows, seconds=100.0)
    report = build_run_report(storage, root, "r1")
    assert report.counts == {"done": 1, "skipped": 1, "failed": 3}
    html = Path(report.uri).read_text()
    cards = parse(Path(report.uri)).cards
    assert [c for c, _ in cards] == ["job done", "job skipped", "job failed", "job failed", "job failed"]
    assert re.search(r"<b>1</b><span>done</span>.*<b>1</b><span>skipped</span>.*<b>3</b><span>failed</span>",
                     html, re.S)
    assert "InputError: 2 jobs" in html and "StorageError: 1 job<" in html
    assert re.search(r"<td>pairs\[2\]\.content</td><td class=\"msg\">not an image</td>", html)
    # engine 150 s over 100 s wall on two devices; 1 done in 100 s
    assert "<b>75%</b>" in html and "<b>36</b><span>images per hour" in html
    assert html.count('<svg class="curve"') == 2  # the done and the skipped job


def test_pages_of_a_large_output_link_to_each_other(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    n = 2 * PAGE_SIZE + 34
    for i in range(n):
        storage.write(f"{root}/j{i:05d}.json", metadata.encode(fake_meta(f"j{i:05d}", iterations=4)))
    write_run(storage, root, "big", [{"job": f"j{i:05d}", "status": "done", "seconds": 1.0} for i in range(n)])

    report = build_run_report(storage, root, "big")
    assert len(report.pages) == 3
    first, second, third = (Path(p) for p in report.pages)
    assert second == tmp_path / "out" / "_runs" / "big" / "page-0002.html"
    seen = []
    for page, size in ((first, PAGE_SIZE), (second, PAGE_SIZE), (third, 34)):
        parsed = parse(page)
        assert len(parsed.cards) == size
        seen += [card_id for _, card_id in parsed.cards]
        for link in parsed.links:
            if link.endswith(".html"):
                assert (page.parent / link).resolve().is_file(), f"{page.name}: broken link {link}"
    assert seen == [f"j{i}" for i in range(n)]
    assert 'rel="next"' in second.read_text() and 'rel="prev"' in second.read_text()
    assert 'rel="next"' not in third.read_text()

    catalog = build_catalog_report(storage, root)  # the same jobs found by listing, pages not known ahead
    assert len(catalog.pages) == 3 and catalog.counts["done"] == n


def test_catalog_report_covers_every_run_and_skips_unreadable_metadata(tmp_path, capsys):
    storage, root = Storage(), str(tmp_path / "out")
    for name in ("a", "b", "sub/c"):
        write_job(storage, root, name)
    write_run(storage, root, "night-1", [{"job": "a", "status": "done", "seconds": 2.0},
                                         {"job": "x", "status": "failed", "error": "boom", "kind": "InputError"}])
    write_run(storage, root, "night-2", [{"job": "b", "status": "done", "seconds": 2.0},
                                         {"job": "sub/c", "status": "done", "seconds": 2.0}])
    (tmp_path / "out" / "torn.json").write_bytes(b'{"schema": "stylize.catalog.metad')
    (tmp_path / "out" / "other.json").write_text('{"hello": 1}')
    (tmp_path / "out" / "list.json").write_text("[1, 2]")

    assert main(["report", root]) == 0
    out = capsys.readouterr().out
    assert "catalog.html" in out and "3 done" in out and "skipped 3 unreadable metadata file(s)" in out
    html = (tmp_path / "out" / "_runs" / "catalog.html").read_text()
    assert 'href="night-1.html"' in html and 'href="night-2.html"' in html
    assert re.search(r"<b>3</b><span>done</span>.*<b>1</b><span>failed</span>", html, re.S)
    for name in ("torn.json", "other.json", "list.json"):
        assert f"{tmp_path}/out/{name}" in html
    assert html.count('<article class="job done"') == 3

    # One run, rebuilt from its files alone, elsewhere: links still reach the thumbnails.
    target = tmp_path / "elsewhere" / "night-2.html"
    assert main(["report", root, "--run", "night-2", "-o", str(target)]) == 0
    for link in parse(target).links:
        if "_thumbs" in link:
            assert (target.parent / link).is_file(), link
    assert main(["report", root, "--run", "no-such-run"]) == 1
    assert "no run summary" in capsys.readouterr().err


def test_loss_curve_is_log_scaled_and_marks_scale_changes():
    n = 1000
    losses = {"iteration": list(range(n)), "scale": [1] * 400 + [2] * 600,
              "total": [10.0 ** (6 - 3 * i / n) for i in range(n)], "content": [0.0] + [5.0] * (n - 1),
              "style": [None] * n, "tv": ["x"] * n}
    curve = loss_curve(losses)
    assert [label for label, _, _ in curve.series] == ["total", "content"]  # nothing plottable in style, tv
    total = [tuple(map(float, p.split(","))) for p in curve.series[0][2].split()]
    assert len(total) <= MAX_POINTS + 2
    ys = [y for _, y in total]
    # A power law is a straight line on a log axis: equal steps in x, equal steps in y.
    (x0, y0), (x1, y1) = total[0], total[-1]
    assert all(abs(y - (y0 + (x - x0) * (y1 - y0) / (x1 - x0))) < 0.2 for x, y in total)
    assert ys == sorted(ys) and y1 - y0 > 50  # falling, and across most of the plot's height
    assert [label for _, label in curve.marks] == ["scale 2"]
    assert curve.top == "1e+06" and curve.bottom == "5e+00"
    assert loss_curve({"iteration": [0]}) is None and loss_curve("nonsense") is None


@pytest.mark.parametrize("path, safe", [
    ("_thumbs/a b.jpg", True), ("../x.jpg", False), ("/etc/passwd", False), ("a/../../x", False),
    ("javascript:alert(1)", False), ("s3://b/k", False), ("a\\b", False), ("", False), (None, False),
])
def test_safe_relative(path, safe):
    assert safe_relative(path) == (path if safe else None)


def test_failure_field():
    assert failure_field("pairs[2].content: s3://b/k: no such key") == "pairs[2].content"
    assert failure_field("grid.contents[0].style[1]: not an image") == "grid.contents[0].style[1]"
    assert failure_field("s3://b/k: no such key") is None
    assert failure_field("loss became inf at iteration 1: lower learning_rate") is None


def test_thumbnails_are_small_and_inputs_are_written_once(tmp_path):
    storage, root = Storage(), str(tmp_path)
    big = Image.new("RGB", (1200, 800), (10, 200, 30))
    assert Image.open(io.BytesIO(encode_thumbnail(big))).size == (SIDE, 171)
    assert Image.open(io.BytesIO(encode_thumbnail(Image.new("L", (40, 30))))).size == (40, 30)  # never enlarged
    inputs = {"content": {"sha256": "c" * 64}, "styles": [{"sha256": "s" * 64, "uri": "style.jpg"}]}
    paths = write_thumbnails(storage, root, "a/b", big, big, inputs, [jpeg()])
    assert paths["output"] == "_thumbs/a/b.jpg"
    assert all((tmp_path / p).is_file() for p in [paths["output"], paths["content"], *paths["styles"]])
    # A second job with the same style finds its thumbnail and does not decode the style again.
    again = write_thumbnails(storage, root, "c", big, big, inputs, [b"not an image: never decoded"])
    assert again["styles"] == paths["styles"]


def test_report_on_s3_links_relative_paths(s3, bucket, s3_server, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage, root = Storage(), f"s3://{bucket}/out"
    write_job(storage, root, "cat")
    write_run(storage, root, "r1", [{"job": "cat", "status": "done", "seconds": 2.0}])
    s3.put_object(Bucket=bucket, Key="out/broken.json", Body=b"{")

    assert main(["report", root, "--run", "r1"]) == 0
    page = s3.get_object(Bucket=bucket, Key="out/_runs/r1.html")
    assert page["ContentType"].startswith("text/html")
    parser = Links()
    parser.feed(page["Body"].read().decode())
    assert "../_thumbs/cat.jpg" in parser.links
    assert main(["report", root]) == 0
    assert "skipped 1 unreadable metadata file(s)" in capsys.readouterr().out
    assert "out/_runs/catalog.html" in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}

    with pytest.raises(ConfigError, match="below the output root"):
        build_run_report(storage, root, "r1", target=f"s3://{bucket}/r.html")  # above the root
    with pytest.raises(ConfigError, match="below the output root"):
        build_run_report(storage, root, "r1", target=f"s3://other-{bucket}/out/r.html")
    report = build_run_report(storage, root, "r1", target=f"s3://{bucket}/r.html", base_url="https://cdn.example/out")
    assert "https://cdn.example/out/_thumbs/cat.jpg" in s3.get_object(Bucket=bucket, Key="r.html")["Body"].read().decode()
    assert report.counts["done"] == 1
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert main(["report", root, "--run", "r1", "--endpoint-url", s3_server]) == 0


def test_a_job_log_file_that_is_missing_is_counted_and_the_rest_still_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "CHUNK", 2)  # three job-log files for five jobs
    storage, root = Storage(), str(tmp_path / "out")
    rows = [{"job": f"f{i}", "status": "failed", "error": "boom", "kind": "InputError"} for i in range(5)]
    write_run(storage, root, "r", rows)
    missing = tmp_path / "out" / "_runs" / "r" / "jobs-000001.json"
    missing.unlink()
    report = build_run_report(storage, root, "r")
    assert [card for _, card in parse(Path(report.uri)).cards] == ["j0", "j1", "j2"]  # f0, f1, f4
    assert report.problems == 1 and str(missing) in Path(report.uri).read_text()


def test_a_job_log_that_cannot_be_written_never_stops_the_run(tmp_path, caplog):
    (tmp_path / "out").write_text("a file where the output folder should be")
    log = runs.JobLog(Storage(), str(tmp_path / "out"), "r")
    log.add({"job": "a", "status": "done"})
    log.flush()  # no exception: the job's own outputs are what matter
    assert log.files == 1 and "job log" in caplog.text and "not written (1 jobs left out" in caplog.text
