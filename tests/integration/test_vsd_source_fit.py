"""experiments/exact/vsd_source_fit.py: the diffusion losses of VSD's prior, source and particles, read during a run."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def test_source_fit_measures_the_three_denoisers(analytic_prior, world_cache, tmp_path):
    spec = importlib.util.spec_from_file_location("vsd_source_fit", ROOT / "experiments" / "exact" /
                                                  "vsd_source_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fit.json"
    rows = module.main(["--images", "4", "--steps", "3", "--at", "1", "3", "--t", "100", "700", "--json", str(out),
                        f"prior.cache_dir={world_cache}"])
    assert [r["step"] for r in rows] == [1, 3] and json.loads(out.read_text())["rows"] == rows
    for row in rows:
        for t, v in row["losses"].items():
            # four separable images: their own score denoises them almost exactly, far better than the prior
            assert v["particles"] < 1e-2 * v["prior"], (t, v)
            assert v["source"] > 0 and abs(v["closed"] - (v["prior"] - v["source"]) / (v["prior"] - v["particles"])) < 1e-9
    # after one source update the source is still ~the prior (its residual starts at zero, one small AdamW step)
    first = rows[0]["losses"]
    assert all(abs(v["closed"]) < 0.2 for v in first.values()), first
