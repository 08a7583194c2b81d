"""The prompt layer of 3D targets: views travel to the guidance as an argument and are resolved into texts there."""

from __future__ import annotations

import pytest
import torch

from sdbridge.guidance import BridgeConfig, SDSConfig, build_guidance
from sdbridge.schedules import UniformConfig, build_schedule
from sdbridge.views import StepPrompts, ViewPrompting, Views, edited, perp_neg_views


def test_view_dependent_texts_follow_the_cameras():
    views = Views.at([0.0, 0.0, 0.0, 80.0], [10.0, 90.0, 190.0, 0.0])
    plain = ViewPrompting().resolve(["a cat"] * 4, views)
    assert list(plain) == ["a cat"] * 4 and plain.views is views  # off (image targets): texts unchanged
    on = ViewPrompting(enabled=True).resolve(["a cat"] * 4, views)
    assert list(on) == ["a cat, front view", "a cat, side view", "a cat, back view", "a cat, overhead view"]
    assert on.plain == ["a cat"] * 4 and on.perp_neg is None
    assert ViewPrompting(enabled=True, front_threshold=5.0).resolve(["a cat"], Views.at([0.0], [10.0]))[0] \
        == "a cat, side view"
    with pytest.raises(ValueError, match="2 prompts for 4 views"):
        ViewPrompting(enabled=True).resolve(["a", "b"], views)


def test_a_modifier_lands_before_the_view_suffix():
    """threestudio builds the view text from the modified prompt: ``"<prompt>, ., front view"`` (3D SDS-Bridge)."""
    step = ViewPrompting(enabled=True, perp_neg=True).resolve(["a cat"], Views.at([0.0], [0.0]))
    target = edited(step, lambda p: p + ", .")
    assert list(target) == ["a cat, ., front view"] and target.plain == ["a cat, ."]
    assert target.perp_neg.pos_a == ["a cat, ., front view"]
    assert edited(["a cat"], lambda p: p + "!") == ["a cat!"]  # a plain list: no views, no suffix


def test_every_view_lists_each_direction_once():
    texts = {t for sp in ViewPrompting(enabled=True).every_view(["a cat"]) for t in sp}
    assert texts == {f"a cat, {v} view" for v in ("front", "side", "back", "overhead")}
    assert [list(sp) for sp in ViewPrompting().every_view(["a cat"])] == [["a cat"]]


def _guidance(prior, config, prompting):
    g = build_guidance(config, prior, build_schedule(UniformConfig(), prior.num_train_timesteps),
                       torch.Generator().manual_seed(0), prompting)
    g.setup(10)
    return g


def test_guidance_resolves_views_passed_as_an_argument(tiny_prior):
    """The views given to ``forward`` decide the texts: the same call equals one on the explicit view texts, and
    Perp-Neg uses the views' weights."""
    x0, noise, t = torch.randn(2, *tiny_prior.sample_shape), torch.randn(2, *tiny_prior.sample_shape), 400
    views = Views.at([0.0, 0.0], [0.0, 180.0])
    g = _guidance(tiny_prior, SDSConfig(), ViewPrompting(enabled=True))
    by_views = g(x0, ["a red circle"] * 2, 0, views=views, t=t, noise=noise).grad
    explicit = _guidance(tiny_prior, SDSConfig(), None)(
        x0, ["a red circle, front view", "a red circle, back view"], 0, t=t, noise=noise).grad
    torch.testing.assert_close(by_views, explicit)

    perp = _guidance(tiny_prior, SDSConfig(), ViewPrompting(enabled=True, perp_neg=True))
    step = perp.view_prompting.resolve(["a red circle"] * 2, views)
    assert step.perp_neg.texts() == perp_neg_views(["a red circle"] * 2, views.elevation, views.azimuth).texts()
    out = perp(x0, ["a red circle"] * 2, 0, views=views, t=t, noise=noise)
    assert not torch.allclose(out.grad, by_views)  # the subtracted views change the target
    with pytest.raises(ValueError, match="for 2 views"):
        perp(x0[:1], ["a red circle"], 0, views=views, t=t, noise=noise[:1])


def test_bridge_stage_one_with_views_conditions_on_the_modified_view_text(tiny_prior):
    g = _guidance(tiny_prior, BridgeConfig(stage_one_modifier=", red"), ViewPrompting(enabled=True))
    step = g.view_prompting.resolve(["a circle"], Views.at([0.0], [90.0]))
    assert g.target_texts(step, 0)["cond"] == ["a circle, red, side view"]
    assert isinstance(StepPrompts.of(["x"]), StepPrompts) and StepPrompts.of(step) is step


def test_a_text_mix_is_the_mix_of_the_two_embeddings(tiny_prior, analytic_prior):
    """Perp-Neg's positive on Stable Diffusion is one conditioning on ``r e(a) + (1 - r) e(b)`` (threestudio's
    interpolated view embeddings); the exact prior's texts are distributions and do not mix."""
    from sdbridge.views import TextMix

    a, b = "a cat, front view", "a cat, side view"
    ea, eb = tiny_prior.encode_text([a, b]).value
    mixed = tiny_prior.encode_text([TextMix(a, b, 0.25), a, TextMix(b, b, 0.5)])
    assert torch.allclose(mixed.value[0], 0.25 * ea + 0.75 * eb)
    assert torch.equal(mixed.value[1], ea) and torch.equal(mixed.value[2], eb)
    assert mixed.prompts[0] == "0.25 x (a cat, front view) + 0.75 x (a cat, side view)"
    step = ViewPrompting(enabled=True, perp_neg=True).resolve(["a cat"], Views.at([0.0], [-100.0]))
    (pos,) = step.perp_neg.texts(mix_embeddings=True)["pos"]
    assert (pos.a, pos.b) == ("a cat, side view", "a cat, back view") and pos.r == pytest.approx(1 - 10 / 90)
    assert analytic_prior.encode_text([TextMix("a red circle", "a red circle", 0.3)]).prompts  # one text: fine
    with pytest.raises(TypeError, match="cannot mix"):
        analytic_prior.encode_text([TextMix("a red circle", "a blue square", 0.3)])
