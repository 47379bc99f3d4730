"""The report in a real browser: headless Chromium driven by Selenium.

Every thumbnail loads, every job with metadata has its loss curve, the pages
link to each other, a hostile job name stays text, and the console stays
clean (a Content-Security-Policy violation or a missing file would show there).
Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium``
package (the ``test`` extra); ``.ci/run`` installs the browser.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stylize.catalog import metadata, report, runs
from stylize.catalog.storage import Storage
from stylize.catalog.thumbnails import write_thumbnails

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HOW = "install it with `apt-get install -y chromium chromium-driver` and `pip install selenium` (the test extra)"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")),
    reason=f"needs headless Chromium, chromedriver and selenium: {HOW}",
)
HOSTILE = "<img src=x onerror=alert(1)> 'a\" & b"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def real_output(root: Path, jobs: list[tuple[str, str, str, str]]) -> None:
    """An output folder as a run leaves it: images, thumbnails from real photos, metadata, run files.

    ``jobs`` are (name, status, content file, style file) from tests/data.
    """
    storage = Storage()
    rows = []
    for i, (name, status, content, style) in enumerate(jobs):
        if status == "failed":
            rows.append({"job": name, "status": "failed", "kind": "InputError",
                         "error": f"pairs[{i}].content: <b>{name}</b> is not an image"})
            continue
        photo, painting = (Image.open(DATA / f).convert("RGB") for f in (content, style))
        out = Image.blend(photo, painting.resize(photo.size), 0.5)
        out.save(root / f"{name}.png") if "/" not in name else None
        inputs = {"content": {"sha256": metadata.sha256((DATA / content).read_bytes())},
                  "styles": [{"sha256": metadata.sha256((DATA / style).read_bytes()), "uri": style}]}
        thumbs = write_thumbnails(storage, str(root), name, out, photo, inputs, [(DATA / style).read_bytes()])
        its = list(range(41))
        meta = {"schema": metadata.SCHEMA, "job": name, "device": "cpu", "seconds": 3.0 + i,
                "output": {"uri": str(root / f"{name}.png"), "size": 1}, "engine": {"seconds": 2.5 + i},
                "thumbnails": thumbs,
                "losses": {"iteration": its, "scale": [1] * 20 + [2] * 21, "total": [1e6 / (k + 1) for k in its],
                           "content": [0.0] + [1e3] * 40, "style": [9e5 / (k + 1) for k in its],
                           "tv": [30.0] * 41, "seconds": its}}
        storage.write(str(root / f"{name}.json"), metadata.encode(meta))
        rows.append({"job": name, "status": status, "seconds": meta["seconds"]})
    log = runs.JobLog(storage, str(root), "run-1")
    for row in rows:
        log.add(row)
    log.flush()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    summary = {"schema": runs.RUN_SCHEMA, "flow_run_id": "run-1", "manifest": "demo.yaml", "output": str(root),
               "devices": ["cpu"], "started": "2026-12-02T02:00:00+00:00", "seconds": 30.0, "engine_seconds": 20.0,
               "counts": dict(counts, total=len(rows)), "failures": []}
    storage.write(runs.summary_uri(str(root), "run-1"), json.dumps(summary).encode())


def check_page(browser, url: str) -> dict:
    """Open ``url``; returns what the page shows, once every image has loaded or failed."""
    browser.get(url)
    return browser.execute_script("""
        const images = [...document.images];
        for (const img of images) { img.scrollIntoView(); }
        return {
          images: images.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
          jobs: [...document.querySelectorAll('article.job')].map(a => [
              a.querySelector('h3').textContent, a.className,
              a.querySelectorAll('svg.curve polyline').length]),
          next: (document.querySelector('a[rel=next]') || {}).href || null,
          title: document.title,
        };""")


def wait_loaded(browser, url: str) -> dict:
    import time

    deadline = time.monotonic() + 20
    while True:
        page = check_page(browser, url)
        if all(complete for _, complete, _ in page["images"]) or time.monotonic() > deadline:
            return page
        time.sleep(0.2)


def test_report_in_headless_chromium(browser, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PAGE_SIZE", 3)  # two pages from five jobs
    root = tmp_path / "out"
    root.mkdir()
    real_output(root, [("cat__starry", "done", "chelsea.png", "starry_night.jpg"),
                       (HOSTILE, "done", "astronaut.png", "shipwreck.jpg"),
                       ("broken__starry", "failed", "", ""),
                       ("sub/astronaut__starry", "skipped", "astronaut.png", "starry_night.jpg"),
                       ("cat__shipwreck", "done", "chelsea.png", "shipwreck.jpg")])
    built = report.build_run_report(Storage(), str(root), "run-1")
    assert len(built.pages) == 2

    url = (root / "_runs" / "run-1.html").as_uri()
    browser.get_log("browser")  # start clean
    first = wait_loaded(browser, url)
    second = wait_loaded(browser, first["next"])
    console = browser.get_log("browser")

    assert first["next"] == (root / "_runs" / "run-1" / "page-0002.html").as_uri()
    jobs = first["jobs"] + second["jobs"]
    assert [name for name, _, _ in jobs] == ["cat__starry", HOSTILE, "broken__starry", "sub/astronaut__starry",
                                             "cat__shipwreck"]
    for name, classes, curves in jobs:
        expected = 0 if "failed" in classes else 4  # total, content, style, tv
        assert curves == expected, f"{name}: {curves} loss curves"
    images = first["images"] + second["images"]
    assert len(images) == 4 * 3  # output, content, style for each job that has outputs
    for src, complete, width in images:
        assert complete and width > 0, f"thumbnail {src} did not load"
    assert [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")] == []
