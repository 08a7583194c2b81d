"""experiments/bench/gpu.sh, the one script that fills the benchmark README's GPU blocks: its whole pipeline on the
CPU at toy scale (``--dry-run``), and its refusal to start without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from experiments.bench.run import ALL_METHODS
from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "bench" / "gpu.sh"
README = ROOT / "experiments" / "bench" / "README.md"


def _gpu_sh(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _block(text: str, marker: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    assert start in text and end in text, marker
    return text[text.index(start): text.index(end)]


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="a GPU is here: gpu.sh would run the real benchmark")
def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    res = _gpu_sh("--out-dir", str(tmp_path / "out"), timeout=120)
    assert res.returncode == 1
    assert res.stdout == "" and res.stderr.count("\n") == 1
    assert "no NVIDIA GPU" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow  # ~1 min on 2 cores: every method, two batch sizes, four speed options, two NeRF sizes
def test_dry_run_writes_every_table_into_a_copy_of_the_readme(tmp_path):
    before = README.read_bytes()
    out = tmp_path / "bench"
    res = _gpu_sh("--dry-run", "--out-dir", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert README.read_bytes() == before  # the real README is never written by a dry run

    copy = (out / "README.md").read_text()
    methods = _block(copy, "bench:cpu-tiny_sd")
    assert "--batch-sizes 1 2" in methods and "--readme-path" not in methods and "'classic attention'" in methods
    for batch in (1, 2):
        for method in ALL_METHODS:
            assert f"| tiny_sd | {method} | {batch} |" in methods
    for variant in ("plain", "channels_last", "classic attention", "bfloat16"):
        assert f"| {variant} | sds | 1 |" in methods
    nerf = _block(copy, "bench_nerf:cpu")
    assert "| 8x8 |" in nerf and "| 16x16 |" in nerf and "--readme-path" not in nerf
    assert len(json.loads((out / "methods.json").read_text())["rows"]) == 2 * len(ALL_METHODS)

    log = (out / "gpu.log").read_text()
    summary = log[log.index("=== summary (dry run, CPU)"):]
    assert "methods   ok" in summary and "nerf      ok" in summary and "official" in summary
    assert "sds at batch 1:" in summary and "bridge at batch 2:" in summary  # the targets, read from the rows
    written = summary[summary.index("README blocks written"):].split("log:")[0]
    assert "bench:cpu-tiny_sd" in written and "bench_nerf:cpu" in written and "gpu-" not in written
    assert summary in res.stdout  # the summary also ends the terminal output
