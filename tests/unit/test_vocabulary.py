"""Prompt semantics of the exact prior: selection, modifiers with their documented effects, unknown words."""

from __future__ import annotations

import pytest
import torch

from sdbridge.metrics.exact import LAPLACIAN, sharpness_ratio
from sdbridge.priors.vocabulary import MODIFIERS, UnknownWordError, parse_prompt

BRIDGE_SOURCE = ", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
BRIDGE_TARGET = ", detailed high resolution, high quality, sharp"
NFSD_NEGATIVE = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, "
                 "gloomy")


def test_selection():
    assert parse_prompt("a red circle").concepts() == [("circle", "red")]
    assert len(parse_prompt("a DSLR photo of a circle").concepts()) == 6
    assert len(parse_prompt("").concepts()) == 36
    assert len(parse_prompt("red").concepts()) == 6
    assert set(parse_prompt("a red or blue circle or square").concepts()) == {
        ("circle", "red"), ("circle", "blue"), ("square", "red"), ("square", "blue")}


def test_reference_modifier_phrases_all_have_meanings():
    src = parse_prompt("a red circle" + BRIDGE_SOURCE)
    assert src.modifiers == ("oversaturated", "smooth", "pixelated", "cartoon", "foggy", "hazy", "blurry",
                             "bad structure", "noisy", "malformed")
    assert parse_prompt("a red circle" + BRIDGE_TARGET).modifiers == ()
    neg = parse_prompt(NFSD_NEGATIVE)
    assert neg.modifiers == ("unrealistic", "blurry", "low quality", "out of focus", "ugly", "low contrast", "dull",
                             "dark", "low resolution", "gloomy")
    assert parse_prompt("a circle painting").modifiers == ("painting",)
    assert parse_prompt("a red circle, blurry, smooth, blurry").modifiers == ("blurry", "smooth")  # each word once


def test_unknown_word_lists_the_vocabulary():
    with pytest.raises(UnknownWordError) as err:
        parse_prompt("a red banana")
    msg = str(err.value)
    assert "banana" in msg and "circle" in msg and "oversaturated" in msg and "filler words" in msg
    with pytest.raises(UnknownWordError, match="low"):
        parse_prompt("a low circle")


def test_identity_words_leave_the_distribution_unchanged(analytic_prior):
    a = analytic_prior.mixture("a red circle")
    b = analytic_prior.mixture("a red circle" + BRIDGE_TARGET)
    assert [s.key for s in a.sets] == [s.key for s in b.sets] == ["clean|circle"] and a.sets[0] is b.sets[0]
    assert torch.equal(a.log_pi[0], b.log_pi[0])


def _chroma(x):
    return (x - x.mean(1, keepdim=True)).pow(2).mean().sqrt().item()


def _brightness(x):
    return x.mean().item()


def _contrast(x):
    return x.std().item()


def _block_constant(x):  # max deviation inside 4x4 blocks
    blocks = x.unfold(2, 4, 4).unfold(3, 4, 4)
    return (blocks - blocks.mean((-1, -2), keepdim=True)).abs().amax().item()


# modifier -> (measure, expected direction relative to the unmodified prompt): documented effects
EFFECTS = {
    "oversaturated": ("chroma", "up"),
    "smooth": ("sharpness", "down"),
    "pixelated": ("blocks", "constant"),
    "cartoon": ("sharpness", "down"),
    "foggy": ("contrast", "down"),
    "hazy": ("contrast", "down"),
    "blurry": ("sharpness", "down"),
    "bad structure": ("mean_shift", "changed"),
    "noisy": ("sharpness", "up"),
    "malformed": ("mean_shift", "changed"),
    "unrealistic": ("chroma", "up"),
    "low quality": ("sharpness", "down"),
    "out of focus": ("sharpness", "down"),
    "ugly": ("chroma", "down"),
    "low contrast": ("contrast", "down"),
    "dull": ("chroma", "down"),
    "dark": ("brightness", "down"),
    "low resolution": ("sharpness", "down"),
    "gloomy": ("brightness", "down"),
    "painting": ("mean_shift", "changed"),
}


def test_every_modifier_has_a_documented_effect():
    assert set(EFFECTS) == set(MODIFIERS)


@pytest.mark.parametrize("word", sorted(EFFECTS))
def test_modifier_changes_samples_as_documented(analytic_prior, word):
    """The corrupted copy a modifier mixes in shows the documented effect (its samples against the clean ones)."""
    p = analytic_prior
    base = "a yellow square"
    mix = p.mixture(f"{base}, {word}")
    corrupted = type(mix)(mix.prompt, mix.sets[1:], [lp - torch.logsumexp(lp.flatten(), 0) for lp in mix.log_pi[1:]],
                          mix.concepts, mix.size, mix.amps[1:])
    clean = p.to_pixels(p.sample(base, 64, torch.Generator().manual_seed(0)))
    mod = p.to_pixels(corrupted.sample(64, torch.Generator().manual_seed(0)).float().view(64, *p.sample_shape))
    measure, direction = EFFECTS[word]
    if measure == "sharpness":
        ref = p.mixture(base)
        before, after = sharpness_ratio(p.from_pixels(clean), ref), sharpness_ratio(p.from_pixels(mod), ref)
        assert (after < 0.8 * before) if direction == "down" else (after > 1.5 * before), (before, after)
    elif measure == "blocks":
        geo_mean = corrupted.sets[0].geo.mu.float().view(-1, 1, p.config.size, p.config.size)
        assert _block_constant(clean) > 0.1 and _block_constant(geo_mean) < 1e-5
    elif measure == "mean_shift":
        a, b = p.mixture(base).mean(), corrupted.mean()
        assert (a - b).norm() > 0.05 * a.norm()
    else:
        fn = {"chroma": _chroma, "brightness": _brightness, "contrast": _contrast}[measure]
        before, after = fn(clean), fn(mod)
        assert (after < before - 0.02) if direction == "down" else (after > before + 0.02), (before, after)


def test_modifier_expected_sharpness_is_exact(analytic_prior):
    """The closed-form expected high-frequency energy matches a Monte-Carlo estimate, and blur lowers it."""
    p = analytic_prior
    mix = p.mixture("a blue cross, blurry")
    x = p.sample("a blue cross, blurry", 4096, torch.Generator().manual_seed(0))
    assert sharpness_ratio(x, mix) == pytest.approx(1.0, abs=0.05)
    assert mix.expected_spatial_energy(LAPLACIAN) < p.mixture("a blue cross").expected_spatial_energy(LAPLACIAN)


def test_readme_vocabulary_table_is_the_code_table():
    from pathlib import Path

    from sdbridge.priors.vocabulary import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate with: python -m sdbridge.priors.vocabulary"


def test_the_papers_modifier_word_lists_are_their_prompts_words():
    """The vocabulary's lists of Bridge's source words and NFSD's negative words (what prior=learned trains on) are
    the words of the official strings in the guidance modules."""
    from sdbridge.guidance.bridge import SOURCE_MODIFIER
    from sdbridge.guidance.nfsd import NFSD_NEGATIVE
    from sdbridge.priors.vocabulary import BRIDGE_SOURCE_WORDS, NFSD_NEGATIVE_WORDS

    assert parse_prompt("a circle" + SOURCE_MODIFIER).modifiers == BRIDGE_SOURCE_WORDS
    assert parse_prompt("a circle, " + NFSD_NEGATIVE).modifiers == NFSD_NEGATIVE_WORDS
