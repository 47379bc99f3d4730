"""`stylize plan` estimates a run's engine time from earlier jobs' recorded seconds."""

from __future__ import annotations

from PIL import Image

from stylize.app.cli import main
from stylize.catalog import metadata
from stylize.catalog.estimate import job_work
from stylize.catalog.storage import Storage


def earlier_job(name: str, device: str, seconds: float) -> dict:
    """Two levels (32x24, 64x48) of 10 planned iterations; early stopping ended the first after 5."""
    scales = [1] * 6 + [2] * 10  # record 0 is the start, then 5 iterations at level 1 and 10 at level 2
    return {"schema": metadata.SCHEMA, "job": name, "device": device, "seconds": seconds + 1,
            "settings": {"iterations": 10}, "engine": {"sizes": [[32, 24], [64, 48]], "seconds": seconds},
            "losses": {"iteration": list(range(16)), "scale": scales}}


def test_job_work_counts_pixel_iterations():
    assert job_work(earlier_job("a", "cuda:1", 2.0)) == ("cuda", 2.0, 5 * 768 + 10 * 3072, 10 * (768 + 3072))
    assert job_work({"engine": {}}) is None
    assert job_work({**earlier_job("a", "cpu", 1.0), "engine": {"sizes": [], "seconds": 1.0}}) is None


def test_plan_estimates_from_history_per_device_kind(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (128, 96), (i, 50, 90)).save(tmp_path / "photos" / f"p{i}.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "style.png")
    (tmp_path / "manifest.yaml").write_text(
        "version: 1\noutput: out\ndefaults: {size: 64, scales: 2, iterations: 10}\n"
        "grid:\n  contents: [photos/]\n  styles: [style.png]\n")

    assert main(["plan", str(tmp_path / "manifest.yaml")]) == 0
    assert f"estimate: no earlier jobs under {tmp_path / 'out'} to estimate from" in capsys.readouterr().out

    storage = Storage()
    work = 5 * 768 + 10 * 3072  # pixel-iterations of each earlier job: 34,560
    for i, (device, seconds) in enumerate([("cpu", 34.56), ("cpu", 34.56), ("cuda:0", 0.3456)]):
        storage.write(str(tmp_path / "out" / f"old{i}.json"), metadata.encode(earlier_job(f"old{i}", device, seconds)))
    (tmp_path / "out" / "torn.json").write_text("{")  # ignored
    assert main(["plan", str(tmp_path / "manifest.yaml")]) == 0
    out = capsys.readouterr().out
    # The photos give one level (64x48; 32 px is below the smallest level): 3 x 3,072 x 10 planned
    # pixel-iterations, of which the history ran 90%: 82,944; at 1e-3 s each on the cpu, 83 s.
    assert f"{1e6 * 34.56 / work:.3g} s per megapixel-iteration" in out
    cpu, cuda = [line for line in out.splitlines() if line.startswith("estimate on one")]
    assert cpu.startswith("estimate on one cpu device: about 83 s of engine time for 3 job(s)") and \
        "90% of the planned iterations, from 2 earlier job(s)" in cpu
    assert cuda.startswith("estimate on one cuda device: about 1 s of engine time") and "from 1 earlier job(s)" in cuda
