"""experiments/exact/gradient_noise.py: the SDS gradient's mean, spread across noise draws and texture term."""

from __future__ import annotations

import importlib.util

import torch

from tests.conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("gradient_noise", ROOT / "experiments" / "exact" / "gradient_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_texture_term_restores_texture_added_to_exact_samples(analytic_prior):
    module = load_script()
    gen = torch.Generator().manual_seed(0)
    samples = analytic_prior.sample("a red circle", 4, gen).float()
    textured = samples + 0.5 * torch.randn(samples.shape, generator=gen)
    row = module.summary(module.sds_draws(analytic_prior, textured, "a red circle", 300, 7.5, 8, gen), textured)
    # the expected step takes a share of the added texture away (measured 0.13-0.46 over t, README)
    assert 0.05 < row["k"] < 1, row
    # on clean samples the gradient hardly depends on the draw at t = 300
    clean = module.summary(module.sds_draws(analytic_prior, samples, "a red circle", 300, 40, 8, gen), samples)
    assert clean["sd"] < 0.3 * clean["mean"], clean


def test_script_reads_a_run_directory(analytic_prior, world_cache, tmp_path, capsys):
    module = load_script()
    (tmp_path / "config.yaml").write_text(
        f"prior:\n  cache_dir: {world_cache}\n  device: cpu\n"
        "prompt:\n  text: null\n  file: null\n  texts: [a red circle, a blue square]\n  repeat: 2\n")
    images = analytic_prior.sample("a red circle", 2, torch.Generator().manual_seed(1))
    torch.save(torch.cat([images, torch.zeros_like(images)]), tmp_path / "model_samples.pt")
    rows = module.main([str(tmp_path), "--scales", "7.5", "--ts", "500", "--draws", "2"])
    assert [(r["images"], r["scale"], r["t"]) for r in rows] == [("exact samples", 7.5, 500),
                                                                 ("the run's images", 7.5, 500)]
    assert all(r["sd"] > 0 and r["mean"] > 0 for r in rows)
    assert "'a red circle': 2 images" in capsys.readouterr().out
