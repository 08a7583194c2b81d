"""Text-to-3D on the exact prior: a NeRF guided by a view-invariant concept approaches the concept's distribution.

The exact world is view-invariant (view words are the identity, sdbridge/priors/vocabulary.py), so "a red ball"
has one exact image distribution from every camera: the red-circle concept. Turntable renders of the NeRF are
scored against it with the exact Frechet distance, at initialization (the Magic3D blob: a gray ball) and after a
short SDS run.

The run uses a learned env-map background, whose initial gray puts the initial renders far from the concept (FD
~2200). With the demo's solid background (the world's own dark gray, conf/target/nerf.yaml) the initial gray blob
is already at FD 342 (NLL 363 bits/dim) and 300 steps end at FD 381 although the renders become a red ball: FD to a
concept *distribution* also charges a single scene for having no diversity (collapse ~0.9), so it is not the measure
of that configuration (the 1000-step demo ends at NLL 66 bits/dim).
"""

from __future__ import annotations

import pytest
import torch

from sdbridge.cli import run
from sdbridge.config import to_objects
from sdbridge.eval.exact import exact_metrics
from sdbridge.priors import build_prior
from sdbridge.prompts import load_prompts
from sdbridge.targets.nerf.target import NeRFTarget
from tests.conftest import compose

pytestmark = pytest.mark.slow


def test_nerf_of_a_ball_approaches_the_concept_distribution(tmp_path, world_cache):
    config = to_objects(compose([
        "target=nerf", "guidance=sds", f"prior.cache_dir={world_cache}", "trainer.max_steps=300",
        "logger=none", "trainer.progress_bar=false", "trainer.save_every=0", "trainer.checkpoint_every=0",
        "target.mesh_resolution=0", "target.cameras.batch_size=1", "target.cameras.eval_views=12",
        "target.renderer.num_samples=32", "target.renderer.background=envmap",
    ]))
    prior = build_prior(config.prior)
    prompts = load_prompts(config.prompt)
    initial = NeRFTarget(config.target, prior, 1, torch.Generator().manual_seed(config.seed), prompts)
    before = exact_metrics(prior, initial.model_samples(), initial.sample_prompts(prompts))["mean"]["fd"]
    after = run(config, tmp_path)["exact_metrics"]["mean"]["fd"]
    print(f"exact FD of 12 turntable renders to 'a red ball': {before:.0f} at init -> {after:.0f} after 300 SDS steps")
    assert after < 0.6 * before
    # and the FD dropped because a red ball appeared, not because the scene emptied (an empty dark frame is
    # also closer to the concept than the gray blob): reload the final field and look at its renders
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    initial.load_state_dict({k[len("target."):]: v for k, v in state.items() if k.startswith("target.")})
    views = initial.turntable(side=32)
    centre = (slice(None), slice(None), slice(12, 20), slice(12, 20))
    assert views["opacity"][centre].mean() > 0.5  # an object in the middle of every view
    r, g, b = views["rgb"][centre].mean(dim=(0, 2, 3)).tolist()
    # and it is red. Measured on world v2: (0.18, 0.04, 0.05), a dim red, as SDS's 2D images are dim on this world
    # (experiments/exact/README.md: CFG acts only through component weights); round 1 reached r > 0.5
    assert r > 0.15 and r > 2 * g and r > 2 * b, (r, g, b)
