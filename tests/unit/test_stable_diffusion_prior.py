"""The real Stable Diffusion code path, exercised with the tiny random-weight SD built offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdbridge.guidance import SDS, SDSConfig, classifier_free_guidance
from sdbridge.priors import PriorUnavailableError, StableDiffusionConfig, StableDiffusionPrior
from sdbridge.priors.tiny import TinySDConfig, TinySDPrior, build_tiny_sd, tiny_sd_folder
from sdbridge.schedules import UniformConfig, build_schedule


def test_tiny_sd_saves_and_reloads_offline(tiny_prior, tiny_cache):
    folder = tiny_sd_folder(TinySDConfig(cache_dir=str(tiny_cache)))
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # A plain StableDiffusionPrior pointed at the folder loads the same model.
    again = StableDiffusionPrior(StableDiffusionConfig(model=str(folder), device="cpu"))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    c = [again.encode_text(["a dog", "a cat"])]
    assert torch.equal(again.predict_eps(x, t, c), tiny_prior.predict_eps(x, t, [tiny_prior.encode_text(["a dog", "a cat"])]))


def test_tiny_sd_is_deterministic_per_seed(tmp_path):
    a = build_tiny_sd(tmp_path / "a", seed=3)
    b = build_tiny_sd(tmp_path / "b", seed=3)
    c = build_tiny_sd(tmp_path / "c", seed=4)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_real_clip_tokenizer(tiny_prior):
    tok = tiny_prior.tokenizer
    assert len(tok) == 49408
    # OpenAI CLIP ids: <|startoftext|>=49406, a=320, photo=1125, of=539, dog=1929, <|endoftext|>=49407
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_empty_tokenizer_is_refused(tiny_cache, tmp_path):
    import shutil

    from transformers import CLIPTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder(TinySDConfig(cache_dir=str(tiny_cache))), broken)
    shutil.rmtree(broken / "tokenizer")
    CLIPTokenizer().save_pretrained(broken / "tokenizer")  # transformers' silent 3-token default
    with pytest.raises(PriorUnavailableError, match="tokenizer"):
        StableDiffusionPrior(StableDiffusionConfig(model=str(broken), device="cpu"))


def test_unavailable_model_fails_fast_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorUnavailableError) as err:
        StableDiffusionPrior(StableDiffusionConfig(model="nobody/no-such-model-xyz"))
    msg = str(err.value)
    assert "nobody/no-such-model-xyz" in msg and "hf download" in msg and "prior=tiny_sd" in msg
    with pytest.raises(PriorUnavailableError, match="does not exist"):
        StableDiffusionPrior(StableDiffusionConfig(model="/no/such/folder"))


def test_cfg_batched_call_equals_separate_calls_and_counts_nfes(tiny_prior):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 400, 900])
    cond = tiny_prior.encode_text(["a dog", "a red car", "a dog"])
    unc = tiny_prior.encode_text(["", "", ""])
    before = tiny_prior.nfe
    both = tiny_prior.predict_eps(x, t, [unc, cond])
    assert tiny_prior.nfe - before == 2
    torch.testing.assert_close(both[0], tiny_prior.predict_eps(x, t, [unc])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], tiny_prior.predict_eps(x, t, [cond])[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both[0], both[1])  # the text matters


def test_text_embeddings_are_cached(tiny_prior):
    tiny_prior._text_cache.clear()
    calls = []
    original = tiny_prior._encode_prompts
    tiny_prior._encode_prompts = lambda ps: calls.append(list(ps)) or original(ps)
    try:
        tiny_prior.encode_text(["a", "b", "a"])
        tiny_prior.encode_text(["b", "a", "c"])
    finally:
        del tiny_prior._encode_prompts
    assert calls == [["a", "b"], ["c"]]


def test_sds_on_tiny_sd_matches_manual_formula(tiny_prior):
    g = SDS(SDSConfig(scale=7.5), tiny_prior, build_schedule(UniformConfig()), torch.Generator().manual_seed(0))
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([200, 700])
    out = g(x0, ["a dog", "a cat"], 0, t=t, noise=noise)
    abar = tiny_prior.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps_u = tiny_prior.predict_eps(x_t, t, [tiny_prior.encode_text(["", ""])])[0]
    eps_c = tiny_prior.predict_eps(x_t, t, [tiny_prior.encode_text(["a dog", "a cat"])])[0]
    expected = (1 - abar) * (classifier_free_guidance(eps_u, eps_c, 7.5) - noise)
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-5)


def test_v_prediction_is_served_as_epsilon(tiny_cache):
    eps_model = TinySDPrior(TinySDConfig(cache_dir=str(tiny_cache), device="cpu"))
    v_model = TinySDPrior(TinySDConfig(cache_dir=str(tiny_cache), device="cpu", prediction_type="v_prediction"))
    assert v_model.prediction_type == "v_prediction"
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 990])
    emb = v_model.encode_text(["a", "b"])
    raw = v_model.unet(x, t, encoder_hidden_states=emb.value).sample  # same weights: the raw output is v
    abar = v_model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(v_model.predict_eps(x, t, [emb])[0], abar.sqrt() * raw + (1 - abar).sqrt() * x)
    # eps-model: the raw output is returned unchanged
    torch.testing.assert_close(eps_model.predict_eps(x, t, [eps_model.encode_text(["a", "b"])])[0],
                               eps_model.unet(x, t, encoder_hidden_states=emb.value).sample)


def test_encode_decode_shapes_and_schedule(tiny_prior):
    img = torch.rand(2, 3, 64, 64)
    z = tiny_prior.encode(img)
    assert z.shape == (2, 4, 8, 8)
    assert tiny_prior.decode(z).shape == (2, 3, 64, 64)
    assert tiny_prior.encode(torch.rand(1, 3, 40, 40)).shape == (1, 4, 8, 8)  # resized to the VAE's size
    ac = tiny_prior.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float64
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(ac.float(), reference, rtol=1e-5, atol=1e-7)
    assert ac[0].item() == pytest.approx(1 - 0.00085)


def test_encode_sample_draws_from_the_vae_posterior(tiny_prior):
    """``encode_sample`` = diffusers' ``latent_dist.sample()`` (threestudio's ``encode_images``, the SDI notebook's
    round trip): mean + std * N(0, I), the noise from the given generator; ``encode`` is the mean."""
    from sdbridge import rng

    images = torch.rand(2, 3, tiny_prior.image_size, tiny_prior.image_size, generator=torch.Generator().manual_seed(3))
    posterior = tiny_prior.vae.encode(2 * images - 1).latent_dist
    noise = rng.randn(tuple(posterior.mean.shape), torch.Generator().manual_seed(5))
    drawn = tiny_prior.encode_sample(images, torch.Generator().manual_seed(5))
    assert torch.allclose(drawn, (posterior.mean + posterior.std * noise) * tiny_prior.vae_scale, atol=1e-6)
    assert torch.allclose(tiny_prior.encode(images), posterior.mean * tiny_prior.vae_scale, atol=1e-6)
    assert (drawn - tiny_prior.encode(images)).abs().max() > 0


def test_sdi_2d_round_trip_samples_the_posterior(tiny_prior):
    """experiment=sdi_2d's target is computed from a posterior draw of decode(x0), as the notebook's
    ``encode_images``; ``guidance.reencode_mean=true`` takes the mean (deterministic)."""
    from sdbridge.guidance import SDIConfig, build_guidance
    from sdbridge.schedules import UniformConfig, build_schedule

    def grad(**kw):
        g = build_guidance(SDIConfig(reencode=True, **kw), tiny_prior, build_schedule(UniformConfig(), 1000),
                           torch.Generator().manual_seed(0))
        x0 = torch.randn(1, *tiny_prior.sample_shape, generator=torch.Generator().manual_seed(1))
        return g(x0, ["a cat"], 0, t=torch.tensor([500]), noise=torch.zeros_like(x0)).grad

    assert torch.equal(grad(reencode_mean=True), grad(reencode_mean=True))
    assert not torch.allclose(grad(), grad(reencode_mean=True), atol=1e-6)
