"""experiments/bench/official.py: both sides run, time their steps and do the same UNet work (a few steps only; the
numbers are not asserted)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("method", ["sds", "ism"])
def test_official_and_sdbridge_sides_record_equal_work(method, tmp_path, tiny_prior, tiny_cache):
    """SDS: the same one CFG call per step on both sides. ISM: the official loop replays sdbridge's timesteps, so the
    inversion lengths match; the official extra call at s = 1 is accounted for."""
    from experiments.bench.official import equal_work, main, summarize, table_text

    common = ["--method", method, "--steps", "3", "--warmup", "1", "--save-every", "2", "--device", "cpu",
              "--threads", "1", "--cache-dir", str(tiny_cache)]
    ours, official = tmp_path / "sdbridge.json", tmp_path / "official.json"
    assert main([*common, "--side", "sdbridge", "--json", str(ours)]) == 0
    assert main([*common, "--side", "official", "--json", str(official), "--match", str(ours)]) == 0
    b, o = json.loads(ours.read_text()), json.loads(official.read_text())
    for rec, side in ((b, "sdbridge"), (o, "official")):
        assert rec["side"] == side and rec["method"] == method
        assert len(rec["ms"]) == len(rec["calls"]) == len(rec["rows"]) == 4  # warm-up + timed steps
        assert len(rec["t"]) == 5 and rec["median_ms"] > 0 and rec["mean_ms"] > 0
    assert equal_work(o, b) == []
    if method == "sds":
        assert b["calls"] == o["calls"] == [1] * 4 and b["rows"] == o["rows"] == [2] * 4
    else:
        assert o["t"] == b["t"]  # replayed
        assert all(c >= 2 for c in b["calls"])  # inversion steps below s + the step to t + the CFG call
    rows = summarize({method: {"official": [o], "sdbridge": [b]}})
    assert rows[0]["ratio"] == pytest.approx(b["median_ms"] / o["median_ms"])
    assert f"| {method} |" in table_text(rows, "cmd", b)


def test_all_in_one_process_writes_the_table(tmp_path, tiny_prior, tiny_cache):
    """``--all`` (one process, the model shared by both sides) checks equal work per pair and writes its table
    between the README markers of the copy it is pointed at, without the copy's path in the command line."""
    from experiments.bench.official import main

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- bench:official-cpu-tiny_sd-quick:start -->\nold\n"
                      "<!-- bench:official-cpu-tiny_sd-quick:end -->\n")
    out = tmp_path / "all.json"
    assert main(["--all", "--quick", "--methods", "sds", "nfsd", "--device", "cpu", "--threads", "1", "--cache-dir",
                 str(tiny_cache), "--json", str(out), "--readme", "--readme-path", str(readme)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["sds", "nfsd"]
    nfsd = rows[1]
    assert (nfsd["official_calls"], nfsd["official_rows"], nfsd["sdbridge_calls"], nfsd["sdbridge_rows"]) == (2, 4, 1, 3)
    text = readme.read_text()
    assert "old" not in text and "| sds |" in text and "| nfsd |" in text and "--readme-path" not in text
    assert "one process sharing the model" in text


def test_unequal_work_is_refused(tmp_path):
    from experiments.bench.official import equal_work

    base = dict(method="sds", prior="tiny_sd", latent_size=None, dtype="float32", seed=0, steps=2, warmup=0,
                save_every=10, t=[1, 2, 3])
    official = {**base, "calls": [1, 1], "rows": [2, 2], "extra_calls": [0, 0], "extra_rows": [0, 0]}
    assert equal_work(official, {**base, "calls": [1, 1], "rows": [2, 2]}) == []
    assert "step 1" in equal_work(official, {**base, "calls": [1, 2], "rows": [2, 4]})[0]
    assert "seed" in equal_work(official, {**base, "seed": 1, "calls": [1, 1], "rows": [2, 2]})[0]


def test_the_official_side_runs_diffusers_stock_attention_on_shared_modules(tiny_prior, monkeypatch):
    """sdbridge's prior routes its attention layers to their processors (``direct_attention``); a shared prior's
    modules run the stock ``Attention.forward`` while the official side runs, and sdbridge's routing after."""
    from diffusers.models.attention_processor import Attention

    from experiments.bench import official

    layers = [m for module in (tiny_prior.unet, tiny_prior.vae) for m in module.modules() if isinstance(m, Attention)]
    routed = lambda: [("forward" in m.__dict__) for m in layers]  # noqa: E731
    assert layers and all(routed())
    seen = []
    monkeypatch.setattr(official, "_run_official", lambda args, plan, prior: seen.append(routed()) or {})
    assert official.run_official(None, None, tiny_prior) == {}
    assert seen and not any(seen[0]) and all(routed())


def test_stub_unet_times_the_framework_alone(tmp_path, tiny_cache):
    """``--stub-unet`` (in its own process: it replaces the UNet class's forward) runs both sides with equal work and
    says so in its table; it refuses to write the README."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "stub.json"
    cmd = [sys.executable, "experiments/bench/official.py", "--all", "--quick", "--methods", "sds", "--device", "cpu",
           "--threads", "1", "--cache-dir", str(tiny_cache), "--stub-unet"]
    done = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "zero-cost stub" in done.stdout and json.loads(out.read_text())["rows"][0]["method"] == "sds"
    refused = subprocess.run([*cmd, "--readme"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--stub-unet" in refused.stderr
