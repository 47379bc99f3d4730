"""`benchmarks/gpu.sh --device cpu --quick` runs end to end and prints every figure the GPU run reports."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_prints_every_figure(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for figure in ("measured 3x3 conv peak: bf16", "bf16 batch 1:", "bf16 best batch", "TFLOP/s",
                   "% of the measured bf16 conv peak", "judged loss", "images/hour through the flow:",
                   "batch occupancy:", "device utilization:"):
        assert figure in text, f"{figure!r} missing from:\n{text}"
    assert "12 of 12 jobs done" in text  # 4 mixed-shape photos x 3 styles through the real flow
    assert "not in the run summary" not in text
    # part 5, print sizes (issue 13): the one-level rows under the default budget and max_memory, then the
    # print schedule against its preview; their lines, not their figures
    for line in ("print size 128x128", "  default budget (float32): ", "  max_memory 6GiB (float32): ",
                 "print schedule to 256 px against the default 64 px run", "  print / preview time: ",
                 "  judged at 64 px, content: print ", "  judged at 64 px, style: print "):
        assert line in text, f"{line!r} missing from:\n{text}"
    for figure in ("s per MP-iteration", "of the budget", "history", "levels 64: "):
        assert figure in text, f"{figure!r} missing from:\n{text}"
