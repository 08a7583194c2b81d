"""Text-to-3D on the exact prior: a NeRF guided by a view-invariant concept approaches the concept's distribution.

The exact world is view-invariant (view words are the identity, sdbridge/priors/vocabulary.py), so "a red ball"
has one exact image distribution from every camera: the red-circle concept. Turntable renders of the NeRF are
scored against it with the exact Frechet distance, at initialization (the Magic3D blob: a gray ball) and after a
short SDS run.

The run uses a learned env-map background, whose initial gray puts the initial renders far from the concept (FD
19,325 on world v2; ~2,200 on round 1's world). Round 1 measured the demo's solid background (the world's own dark
gray, conf/target/nerf.yaml): the initial gray blob was already close (FD 342) and FD to a concept *distribution*
also charges a single scene for having no diversity, so it is not the measure of that configuration.
"""

from __future__ import annotations

import pytest
import torch

from sdbridge.runner import run
from sdbridge.config import to_objects
from sdbridge.metrics.exact import exact_metrics
from sdbridge.priors import build_prior
from sdbridge.prompts import load_prompt_set
from sdbridge.targets.nerf.target import NeRFTarget
from tests.conftest import compose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ball(tmp_path_factory, world_cache):
    """300 SDS steps of "a red ball": the exact FD of 12 turntable renders before and after, and the final
    renders' centre (opacity, mean RGB)."""
    tmp_path = tmp_path_factory.mktemp("ball")
    config = to_objects(compose([
        "target=nerf", "guidance=sds", f"prior.cache_dir={world_cache}", "trainer.max_steps=300",
        "logger=none", "trainer.progress_bar=false", "trainer.save_every=0", "trainer.checkpoint_every=0",
        "target.mesh_resolution=0", "target.cameras.batch_size=1", "target.cameras.eval_views=12",
        "target.renderer.num_samples=32", "target.renderer.background=envmap",
    ]))
    prior = build_prior(config.prior)
    prompts = load_prompt_set(config.prompt).texts
    initial = NeRFTarget(config.target, prior, 1, torch.Generator().manual_seed(config.seed), prompts)
    before = exact_metrics(prior, initial.model_samples(), initial.sample_prompts(prompts))["mean"]["fd"]
    after = run(config, tmp_path)["exact_metrics"]["mean"]["fd"]
    # reload the final field and look at its renders
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    initial.load_state_dict({k[len("target."):]: v for k, v in state.items() if k.startswith("target.")})
    views = initial.turntable(side=32)
    centre = (slice(None), slice(None), slice(12, 20), slice(12, 20))
    rgb = views["rgb"][centre].mean(dim=(0, 2, 3)).tolist()
    opacity = float(views["opacity"][centre].mean())
    print(f"exact FD of 12 turntable renders to 'a red ball': {before:.0f} at init -> {after:.0f} after 300 SDS "
          f"steps; centre opacity {opacity:.2f}, RGB {rgb}")
    return before, after, opacity, rgb


def test_nerf_of_a_ball_approaches_the_concept_distribution(ball):
    """Measured (world v2, contrast + shape pull): FD 19325 -> 8298, centre opacity 0.94."""
    before, after, opacity, _ = ball
    assert after < 0.6 * before
    # the FD dropped because an object appeared, not because the scene emptied (an empty dark frame is also
    # closer to the concept than the gray blob)
    assert opacity > 0.5


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured: the ball ends gray-green, centre RGB (0.49, 0.57, 0.41), with the world's shape pull "
    "(prior.text_pull = 0.05); without it (text_pull=0) dim red (0.14, 0.07, 0.08), and with re-weighting only "
    "(f14c887) (0.18, 0.04, 0.05). Measured on the initial renders: the CFG push x0(cond) - x0(uncond) at the "
    "centre is 0 at t <= 500 without the pull and toward purple-pink at t >= 800 (0.89, 0.40, 0.68 at t = 950: the "
    "gray blob's conditional posterior keeps mass on white and purple circles); the pull adds a colorless push "
    "(0.11-0.16 in every channel) at every t <= 800, which turns it gray; the prompt's color, a few nats of text "
    "weight, does not outvote a gray blob's nearest discs (experiments/exact/nerf_color_push.py). It holds with a "
    "text adherence of 0.99, contrast variation and the text contrast on the chroma (prior.text_adherence=0.99 "
    "contrast_std=0.35 text_contrast_on=chroma, 2026-12-05), a variant that fails other claims; open in issue #12"))
def test_nerf_of_a_ball_is_red(ball):
    r, g, b = ball[3]
    assert r > 0.15 and r > 2 * g and r > 2 * b, (r, g, b)
