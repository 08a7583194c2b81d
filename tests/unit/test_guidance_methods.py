"""Every method's gradient against its closed form, computed by hand on a stub prior with a known eps."""

from __future__ import annotations

import pytest
import torch

from sdbridge.guidance import (
    CSD,
    ISM,
    NFSD,
    SDI,
    SDS,
    Bridge,
    BridgeConfig,
    CSDConfig,
    ISMConfig,
    NFSDConfig,
    SDICached,
    SDICachedConfig,
    SDIConfig,
    SDSConfig,
)
from sdbridge.sampling import ddim_step, inversion_path
from sdbridge.schedules import UniformConfig, build_schedule

PROMPTS = ["a red circle", "a dog", "xy", "a cat"]
B = len(PROMPTS)


def make(cls, cfg, prior, seed=0, max_steps=1000):
    g = cls(cfg, prior, build_schedule(UniformConfig()), torch.Generator().manual_seed(seed))
    g.setup(max_steps)
    return g


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 4, 4, generator=gen), torch.randn(B, 3, 4, 4, generator=gen)


def ab(prior, t):
    return prior.alphas_cumprod[t].float().view(-1, 1, 1, 1)


def noised(prior, x0, noise, t):
    a = ab(prior, t)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def eps(prior, x, t, texts):
    return prior.eps_by_hand(x, t, texts)


def test_nfsd_closed_form_with_both_branches(stub_prior):
    cfg = NFSDConfig(scale=40.0)
    g = make(NFSD, cfg, stub_prior)
    x0, noise = inputs()
    t = torch.tensor([50, 199, 200, 700])
    out = g(x0, PROMPTS, 0, t=t, noise=noise)
    x_t = noised(stub_prior, x0, noise, t)
    e_y, e_0 = eps(stub_prior, x_t, t, PROMPTS), eps(stub_prior, x_t, t, [""] * B)
    e_neg = eps(stub_prior, x_t, t, [cfg.nfsd_negative] * B)
    delta_d = torch.where((t < 200).view(-1, 1, 1, 1), e_0, e_0 - e_neg)
    expected = (1 - ab(stub_prior, t)) * (40.0 * (e_y - e_0) + delta_d)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-5)
    assert out.nfe == 3


@pytest.mark.parametrize("negative", ["", "ugly, blurry"])
def test_csd_closed_form(stub_prior, negative):
    cfg = CSDConfig(scale=7.5, csd_negative=negative, negative_weight_start=1.0, negative_weight_end=0.5)
    g = make(CSD, cfg, stub_prior, max_steps=101)
    x0, noise = inputs()
    t = torch.tensor([30, 300, 600, 900])
    step = 50  # halfway: lambda = 0.75
    out = g(x0, PROMPTS, step, t=t, noise=noise)
    x_t = noised(stub_prior, x0, noise, t)
    e_y, e_0 = eps(stub_prior, x_t, t, PROMPTS), eps(stub_prior, x_t, t, [""] * B)
    expected = 7.5 * (e_y - e_0)
    if negative:
        expected = expected - 0.75 * (eps(stub_prior, x_t, t, [negative] * B) - e_0)
    torch.testing.assert_close(out.grad, (1 - ab(stub_prior, t)) * expected, rtol=1e-5, atol=1e-5)
    assert out.nfe == (3 if negative else 2)


def test_bridge_stage_switch_and_stage_two_closed_form(stub_prior):
    cfg = BridgeConfig(scale=40.0, stage_two_scale=20.0, stage_two_start_step=500)
    g = make(Bridge, cfg, stub_prior)
    sds = make(SDS, SDSConfig(scale=40.0), stub_prior)
    x0, noise = inputs()
    t = torch.tensor([100, 300, 500, 900])
    for step in (0, 499):
        torch.testing.assert_close(g(x0, PROMPTS, step, t=t, noise=noise).grad,
                                   sds(x0, PROMPTS, step, t=t, noise=noise).grad)
    x_t = noised(stub_prior, x0, noise, t)
    e_tgt = eps(stub_prior, x_t, t, [p + cfg.target_modifier for p in PROMPTS])
    e_src = eps(stub_prior, x_t, t, [p + cfg.source_modifier for p in PROMPTS])
    expected = (1 - ab(stub_prior, t)) * 20.0 * (e_tgt - e_src)
    for step in (500, 501, 20000):  # any step past the switch, e.g. after resuming beyond it
        out = g(x0, PROMPTS, step, t=t, noise=noise)
        torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-5)
        assert out.nfe == 2
    assert g.stage(499) == 1 and g.stage(500) == 2


def _invert_by_hand(prior, x0, path, prompts, scale, uncond_only=False, uncond=""):
    x = x0
    e = None
    for i in range(len(path) - 1):
        a_from = torch.ones(B, 1, 1, 1) if int(path[i][0]) == 0 else ab(prior, path[i])
        a_to = ab(prior, path[i + 1])
        e_u = eps(prior, x, path[i], [uncond] * B)
        e = e_u if uncond_only else e_u + scale * (eps(prior, x, path[i], prompts) - e_u)
        x0_hat = (x - (1 - a_from).sqrt() * e) / a_from.sqrt()
        x = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * e
    return x, e


def _official_invert_by_hand(prior, x0, path, prompts, scale):
    """threestudio's SDI inversion (eta 0): a negative start timestep reads x0 at alphas_cumprod[0]."""
    x = x0
    for i in range(len(path) - 1):
        a_from, a_to = ab(prior, path[i].clamp(min=0)), ab(prior, path[i + 1])
        e_u = eps(prior, x, path[i], [""] * B)
        e = e_u + scale * (eps(prior, x, path[i], prompts) - e_u)
        x = a_to.sqrt() * (x - (1 - a_from).sqrt() * e) / a_from.sqrt() + (1 - a_to).sqrt() * e
    return x


def _sdi_official_grad(prior, x0, t, t_end, scale=8.5, inversion_scale=-6.5):
    """x0 - x0_hat with x0_hat from the CFG prediction at (x_{t_end}, t) read at t (threestudio's compute_grad_sdi)."""
    grid = [v for v in range(1, 1000, 100) if v < int(t[0])]
    path = [torch.full((B,), v) for v in (-99, *grid, int(t_end[0]))]
    x_t = _official_invert_by_hand(prior, x0, path, PROMPTS, inversion_scale)
    a = ab(prior, t)
    e_u, e_y = eps(prior, x_t, t, [""] * B), eps(prior, x_t, t, PROMPTS)
    return x0 - (x_t - (1 - a).sqrt() * (e_u + scale * (e_y - e_u))) / a.sqrt()


def test_sdi_defaults_follow_threestudio_closed_form(stub_prior):
    """Official inversion (start at t = -99 with alphas_cumprod[0]; the stub's eps depends on t, so evaluating
    the start at t = 0 would differ) and the notebook's CFG in our convention (8.5 / -6.5)."""
    g = make(SDI, SDIConfig(inversion_eta=0.0, jitter=0), stub_prior)
    x0, _ = inputs()
    t = torch.full((B,), 350)
    out = g(x0, PROMPTS, 0, t=t, noise=torch.zeros_like(x0))
    torch.testing.assert_close(out.grad, _sdi_official_grad(stub_prior, x0, t, t), rtol=1e-4, atol=1e-4)
    assert out.nfe == 2 * (5 + 1)


def test_sdi_target_is_read_at_the_scheduled_t_on_the_latent_inverted_to_t_plus_delta(stub_prior):
    """threestudio evaluates and reads the target at t; only the inversion goes to t + delta. Exactly one delta in
    U{0..99} reproduces the gradient, and t is reported unchanged."""
    x0, _ = inputs()
    t = torch.full((B,), 450)
    out = make(SDI, SDIConfig(inversion_eta=0.0), stub_prior, seed=1)(x0, PROMPTS, 0, t=t)
    assert torch.equal(out.t, t)
    matches = [d for d in range(100)
               if torch.allclose(out.grad, _sdi_official_grad(stub_prior, x0, t, t + d), rtol=1e-4, atol=1e-4)]
    assert len(matches) == 1


def test_sdi_clean_start_option_closed_form(stub_prior):
    g = make(SDI, SDIConfig(scale=7.5, inversion_scale=-7.5, inversion_eta=0.0, jitter=0, clean_start=True), stub_prior)
    x0, _ = inputs()
    t = torch.full((B,), 350)
    out = g(x0, PROMPTS, 0, t=t, noise=torch.zeros_like(x0))
    path = [torch.full((B,), v) for v in (0, 1, 101, 201, 301, 350)]
    x_t, _ = _invert_by_hand(stub_prior, x0, path, PROMPTS, -7.5)
    a = ab(stub_prior, t)
    kappa = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    e_u, e_y = eps(stub_prior, x_t, t, [""] * B), eps(stub_prior, x_t, t, PROMPTS)
    e_hat = e_u + 7.5 * (e_y - e_u)
    expected = ((1 - a) / a).sqrt() * (e_hat - kappa)
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4)
    # the gradient is x0 minus the x0-prediction of the target (SDI's loss)
    x0_hat = (x_t - (1 - a).sqrt() * e_hat) / a.sqrt()
    torch.testing.assert_close(out.grad, x0 - x0_hat, rtol=1e-4, atol=1e-4)
    assert out.nfe == 2 * (5 + 1)


def test_sdi_jitter_is_seeded_and_reported_with_target_at_jittered_t(stub_prior):
    x0, _ = inputs()
    t = torch.full((B,), 450)
    a = make(SDI, SDIConfig(), stub_prior, seed=3)(x0, PROMPTS, 0, t=t)
    b = make(SDI, SDIConfig(), stub_prior, seed=3)(x0, PROMPTS, 0, t=t)
    assert torch.equal(a.grad, b.grad) and torch.equal(a.t, t)
    g = make(SDI, SDIConfig(), stub_prior, seed=4)
    assert len({round(float(g(x0, PROMPTS, 0, t=t).grad.norm()), 6) for _ in range(8)}) > 1  # delta and eta drawn
    jit = make(SDI, SDIConfig(target_at_jittered_t=True), stub_prior, seed=3)(x0, PROMPTS, 0, t=t)
    assert jit.t.unique().numel() == 1 and 450 <= int(jit.t[0]) < 550  # one delta for the batch


def test_sdi_refresh_every_keeps_the_target_between_refreshes(stub_prior):
    """experiment=sdi_2d (the notebook's inversion mode): the target is recomputed every k steps; in between the
    gradient is x0 - x0_hat of the last refresh, for 0 NFEs."""
    g = make(SDI, SDIConfig(inversion_eta=0.0, jitter=0, refresh_every=3), stub_prior)
    x0, _ = inputs()
    t = torch.full((B,), 350)
    first = g(x0, PROMPTS, 0, t=t)
    torch.testing.assert_close(first.grad, _sdi_official_grad(stub_prior, x0, t, t), rtol=1e-4, atol=1e-4)
    moved = 0.5 * x0
    between = g(moved, PROMPTS, 1, t=torch.full((B,), 340))
    torch.testing.assert_close(between.grad, moved - (x0 - first.grad), rtol=1e-5, atol=1e-5)
    assert between.nfe == 0 and torch.equal(between.t, t)
    refreshed = g(moved, PROMPTS, 3, t=t)
    torch.testing.assert_close(refreshed.grad, _sdi_official_grad(stub_prior, moved, t, t), rtol=1e-4, atol=1e-4)
    h = make(SDI, SDIConfig(inversion_eta=0.0, jitter=0, refresh_every=3), stub_prior)
    h.set_extra_state(g.get_extra_state())
    torch.testing.assert_close(h(x0, PROMPTS, 4, t=t).grad, g(x0, PROMPTS, 4, t=t).grad)


def test_sdi_reencode_computes_the_target_from_the_round_trip(stub_prior):
    """The notebook projects the latents through the decoder: the stub's decode/encode round trip clamps to
    [-1, 1], so the target is x0_hat of the clamped x0 and the gradient x0 minus it."""
    x0, _ = inputs()
    x0 = 2 * x0  # beyond [-1, 1] in places
    t = torch.full((B,), 350)
    out = make(SDI, SDIConfig(inversion_eta=0.0, jitter=0, reencode=True), stub_prior)(x0, PROMPTS, 0, t=t)
    clamped = x0.clamp(-1, 1)
    expected = x0 - (clamped - _sdi_official_grad(stub_prior, clamped, t, t))
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4)


def test_sdi_jitter_moves_only_the_last_inversion_step(stub_prior):
    """The grid is chosen below the scheduled t; only the last step goes to t + delta (threestudio's SDI)."""
    x0, _ = inputs()
    g = make(SDI, SDIConfig(scale=7.5, inversion_scale=-7.5, inversion_eta=0.0, jitter=100, clean_start=True,
                            target_at_jittered_t=True), stub_prior, seed=0)
    out = g(x0, PROMPTS, 0, t=torch.full((B,), 450))
    t_used = int(out.t[0])
    path = [torch.full((B,), v) for v in (0, 1, 101, 201, 301, 401, t_used)]
    x_t, _ = _invert_by_hand(stub_prior, x0, path, PROMPTS, -7.5)
    a = ab(stub_prior, out.t)
    e_u, e_y = eps(stub_prior, x_t, out.t, [""] * B), eps(stub_prior, x_t, out.t, PROMPTS)
    expected = ((1 - a) / a).sqrt() * (e_u + 7.5 * (e_y - e_u) - (x_t - a.sqrt() * x0) / (1 - a).sqrt())
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.noise, (x_t - a.sqrt() * x0) / (1 - a).sqrt(), rtol=1e-4, atol=1e-4)


def test_inversion_path_grid():
    path = inversion_path(torch.tensor([350, 50, 999]), 10)
    cols = torch.stack(path, 1).tolist()
    assert cols[0][-6:] == [0, 1, 101, 201, 301, 350]
    assert cols[1][-3:] == [0, 1, 50] and set(cols[1][:-3]) == {0}
    official = torch.stack(inversion_path(torch.tensor([350, 50]), 10, clean_start=False), 1).tolist()
    assert official[0][-6:] == [-99, 1, 101, 201, 301, 350]  # threestudio: timesteps[0] - step_ratio
    assert official[1][-3:] == [-99, 1, 50] and set(official[1][:-3]) == {-99}
    assert cols[2] == [0, 1, 101, 201, 301, 401, 501, 601, 701, 801, 901, 999]


def test_ism_closed_form(stub_prior):
    """LucidDreamer's ISM (the defaults): at step 0 delta_t = int(80 + (1 - 1/1500) 20) = 99, so s = 530 - 99 = 431;
    x0 is noised to t = 1 with the step's noise, inverted with "" at 1, 201, 401 (stride 200) to s, one more step to
    t; the target's CFG uses the negative prompt; the gradient is scaled by lambda_guidance = 0.1."""
    cfg = ISMConfig(negative_prompt="ugly")
    g = make(ISM, cfg, stub_prior)
    x0, noise = inputs()
    t = torch.full((B,), 530)
    out = g(x0, PROMPTS, 0, t=t, noise=noise)
    assert out.extras["delta_t"] == 99
    path = [torch.full((B,), v) for v in (1, 201, 401, 431, 530)]
    x_t, e_s = _invert_by_hand(stub_prior, noised(stub_prior, x0, noise, path[0]), path, PROMPTS, None,
                               uncond_only=True)
    e_n, e_y = eps(stub_prior, x_t, t, ["ugly"] * B), eps(stub_prior, x_t, t, PROMPTS)
    a = ab(stub_prior, t)
    expected = 0.1 * ((1 - a) / a).sqrt() * (e_n + 7.5 * (e_y - e_n) - e_s)
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4)
    assert out.nfe == 4 + 2  # four inversion steps (1, 201, 401, 431 -> next), then CFG
    # after the warm-up (step 1499 on) delta_t = 80
    assert [g.delta_t(k) for k in (0, 74, 75, 749, 1498, 1499, 4999)] == [99, 99, 98, 90, 80, 80, 80]
    assert ISM(ISMConfig(delta_t_ceil=True), stub_prior, g.schedule).delta_t(0) == 100  # train_step_perpneg


def test_ism_earlier_options_give_the_earlier_closed_form(stub_prior):
    """The options that restore sdbridge's earlier ISM: fixed delta_t, inversion of the clean x0 from t = 0 with the
    negative prompt, no gradient scale."""
    cfg = ISMConfig(delta_t_warmup_steps=0, noised_start=False, invert_with_negative=True, lambda_guidance=1.0,
                    negative_prompt="ugly")
    g = make(ISM, cfg, stub_prior)
    x0, _ = inputs()
    t = torch.full((B,), 530)
    out = g(x0, PROMPTS, 0, t=t, noise=torch.randn_like(x0))  # the noise does not enter from a clean start
    path = [torch.full((B,), v) for v in (0, 200, 400, 450, 530)]
    x_t, e_s = _invert_by_hand(stub_prior, x0, path, PROMPTS, None, uncond_only=True, uncond="ugly")
    e_n, e_y = eps(stub_prior, x_t, t, ["ugly"] * B), eps(stub_prior, x_t, t, PROMPTS)
    a = ab(stub_prior, t)
    expected = ((1 - a) / a).sqrt() * (e_n + 7.5 * (e_y - e_n) - e_s)
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4)
    assert out.nfe == 4 + 2 and out.extras["delta_t"] == 80


def test_ism_noise_has_a_shared_offset(stub_prior):
    """noise = randn + 0.1 randn(1, C, 1, 1), the offset shared by the batch; offset_noise = 0 gives plain randn."""
    like = torch.zeros(B, 3, 4, 4)
    g = make(ISM, ISMConfig(), stub_prior, seed=3)
    plain = make(ISM, ISMConfig(offset_noise=0.0), stub_prior, seed=3)
    offset = (g.sample_noise(like) - plain.sample_noise(like)) / 0.1
    assert torch.allclose(offset, offset[:1, :, :1, :1].expand_as(offset), atol=1e-5)
    assert float(offset.abs().max()) > 1e-3


def test_sdi_cached_reuses_the_previous_prediction_and_refreshes(stub_prior):
    g = make(SDICached, SDICachedConfig(scale=7.5, refresh_every=3), stub_prior)
    x0, noise = inputs()
    t = torch.full((B,), 600)
    first = g(x0, PROMPTS, 0, t=t, noise=noise)
    x_t = noised(stub_prior, x0, noise, t)
    e_u, e_y = eps(stub_prior, x_t, t, [""] * B), eps(stub_prior, x_t, t, PROMPTS)
    e_hat = e_u + 7.5 * (e_y - e_u)
    a = ab(stub_prior, t)
    x0_hat = (x_t - (1 - a).sqrt() * e_hat) / a.sqrt()
    torch.testing.assert_close(first.grad, x0 - x0_hat, rtol=1e-4, atol=1e-4)
    assert first.nfe == 2
    moved = x0 * 0.5
    between = g(moved, PROMPTS, 1, t=torch.full((B,), 590), noise=noise)
    torch.testing.assert_close(between.grad, moved - x0_hat, rtol=1e-4, atol=1e-4)
    assert between.nfe == 0
    t2 = torch.full((B,), 500)
    refreshed = g(moved, PROMPTS, 3, t=t2, noise=torch.randn_like(x0))  # the fresh noise must be ignored
    x_t2 = noised(stub_prior, moved, e_hat, t2)  # kappa = the previous eps prediction
    e_u2, e_y2 = eps(stub_prior, x_t2, t2, [""] * B), eps(stub_prior, x_t2, t2, PROMPTS)
    a2 = ab(stub_prior, t2)
    expected = ((1 - a2) / a2).sqrt() * (e_u2 + 7.5 * (e_y2 - e_u2) - e_hat)
    torch.testing.assert_close(refreshed.grad, expected, rtol=1e-4, atol=1e-4)
    state = g.get_extra_state()
    h = make(SDICached, SDICachedConfig(scale=7.5, refresh_every=3), stub_prior)
    h.set_extra_state(state)
    torch.testing.assert_close(h(moved, PROMPTS, 4, t=t2).grad, g(moved, PROMPTS, 4, t=t2).grad)


def test_sdi_cached_first_kappa_is_the_eps_the_denoised_init_came_from(stub_prior):
    """The SDI notebook: x0 = x0_hat(x_T) at t = 999 with CFG, and the first kappa is that eps prediction, so the
    first refresh is the DDIM step from x_T (the stub's x_T is N(0, I), its sample_x_T)."""
    from sdbridge.targets.image import ImageTarget, ImageTargetConfig, Init, Parameterization

    target = ImageTarget(ImageTargetConfig(init=Init.denoised, init_cfg=8.5, parameterization=Parameterization.latent), stub_prior, B,
                         torch.Generator().manual_seed(0), PROMPTS)
    x_T = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t_T = torch.full((B,), 999)
    e_T = eps(stub_prior, x_T, t_T, [""] * B) + 8.5 * (eps(stub_prior, x_T, t_T, PROMPTS) - eps(stub_prior, x_T, t_T, [""] * B))
    a_T = ab(stub_prior, t_T)
    torch.testing.assert_close(target.param.detach(), (x_T - (1 - a_T).sqrt() * e_T) / a_T.sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.initial_noise(), e_T, rtol=1e-5, atol=1e-5)
    g = SDICached(SDICachedConfig(scale=8.5), stub_prior, build_schedule(UniformConfig()), torch.Generator())
    g.setup(1000, initial_noise=target.initial_noise())
    x0 = target.param.detach()
    first = g(x0, PROMPTS, 0, t=torch.full((B,), 980), noise=torch.randn_like(x0))  # fresh noise ignored
    torch.testing.assert_close(first.noise, e_T, rtol=1e-5, atol=1e-5)
    randn_init = ImageTarget(ImageTargetConfig(), stub_prior, B, torch.Generator().manual_seed(0), PROMPTS)
    assert randn_init.initial_noise() is None


def test_samples_init_is_one_exact_sample_of_each_images_prompt(small_analytic_prior, stub_prior):
    """target.init=samples: image i starts at an exact sample of its own prompt (drawn in order from the run's
    generator): exactly in the latent parameterization (the exact prior's default), as its decoded image in pixels;
    a prior without a true distribution refuses it by name."""
    from sdbridge.targets.image import ImageTarget, ImageTargetConfig, Init, Parameterization

    prior, prompts = small_analytic_prior, ["a red circle", "a blue square", "a red circle"]
    gen = torch.Generator().manual_seed(3)
    expected = torch.cat([prior.sample(p, 1, gen) for p in prompts])
    latent = ImageTarget(ImageTargetConfig(init=Init.samples), prior, 3, torch.Generator().manual_seed(3), prompts)
    torch.testing.assert_close(latent.param.detach(), expected)
    assert not torch.equal(expected[0], expected[2])  # one draw per image, not one per prompt
    pixel = ImageTarget(ImageTargetConfig(init=Init.samples, parameterization=Parameterization.pixel), prior, 3,
                        torch.Generator().manual_seed(3), prompts)
    torch.testing.assert_close(pixel.param.detach(), 2 * prior.decode(expected) - 1)  # pixels in range, as saved
    with pytest.raises(ValueError, match="init=samples needs a prior with a true distribution"):
        ImageTarget(ImageTargetConfig(init=Init.samples), stub_prior, B, torch.Generator(), PROMPTS)


def test_full_bridge_needs_a_model_source(stub_prior):
    with pytest.raises(ValueError, match="model source"):
        make(SDS, SDSConfig(full_bridge=True), stub_prior)
    make(CSD, CSDConfig(full_bridge=True), stub_prior)  # fine: eps_src is the unconditional model


def test_full_bridge_with_identical_source_and_target_is_near_zero(analytic_prior):
    """CSD at scale 1 with the prompt as negative text: eps_tgt = eps_src = eps(y); inversion then generation
    returns x0, so the full-bridge gradient vanishes (up to the ODE discretization)."""
    p = analytic_prior
    prompts = ["a red circle"] * 4
    cfg = CSDConfig(scale=1.0, negative_prompt="a red circle", full_bridge=True, bridge_steps=50)
    g = make(CSD, cfg, p)
    x0 = p.sample("a red circle", 4, torch.Generator().manual_seed(0))
    out = g(x0, prompts, 0, t=torch.full((4,), 600))
    assert out.grad.norm() < 0.05 * x0.norm(), (out.grad.norm(), x0.norm())
    # what is left is DDIM's first-order discretization error: twice the steps, about half the error
    finer = make(CSD, CSDConfig(scale=1.0, negative_prompt="a red circle", full_bridge=True, bridge_steps=100), p)
    assert finer(x0, prompts, 0, t=torch.full((4,), 600)).grad.norm() < 0.65 * out.grad.norm()
    assert out.nfe == 50 + 2 * 50  # inversion: the unconditional source; generation: CFG (2 conditionings)
    # source != target: the bridge moves it (from high noise, where the text decides; at t = 600 this world's text
    # can no longer turn a clear blue square into a red circle, as a real model's cannot)
    other = p.sample("a blue square", 4, torch.Generator().manual_seed(0))
    far = make(CSD, CSDConfig(scale=7.5, full_bridge=True, bridge_steps=20), p)(other, prompts, 0, t=950)
    assert far.grad.norm() > 10 * out.grad.norm()


def test_fixed_bridge_grid_paths():
    """``bridge_grid=fixed``: 0, the grid points {100, 200, ...} below each sample's t, then t; shorter paths padded
    at the start with 0 (no move). ``per_sample``: ``bridge_steps`` even steps to each t."""
    from sdbridge.guidance.base import BridgeGrid, bridge_path

    path = torch.stack(bridge_path(torch.tensor([300, 50, 950, 0]), 10, BridgeGrid.fixed))
    assert path.shape == (11, 4)
    assert path[:, 0].tolist() == [0] * 7 + [0, 100, 200, 300]
    assert path[:, 1].tolist() == [0] * 10 + [50]
    assert path[:, 2].tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950]
    assert path[:, 3].tolist() == [0] * 11
    per = torch.stack(bridge_path(torch.tensor([300, 950]), 10, BridgeGrid.per_sample))
    assert per[:, 0].tolist() == list(range(0, 301, 30)) and per[-1, 1] == 950


def test_fixed_bridge_grid_evaluates_only_the_moving_samples(analytic_prior):
    """With per-sample t the fixed grid's paths differ in length; each step evaluates the samples that move (a
    sub-batch). Each sample's gradient is the one it gets alone; with cameras (no sub-batch) the whole batch is
    evaluated and the others kept, with the same result. The round trip stays small, and a batch at t = 250 takes 3
    steps each way (9 NFEs for CSD: 1 + 2 per step), one at t = 950 ten (30)."""
    from sdbridge.guidance.base import prompt_rows
    from sdbridge.views import StepPrompts, Views

    p = analytic_prior
    prompts = ["a red circle", "a blue square", "a red circle"]
    x0 = torch.cat([p.sample(q, 1, torch.Generator().manual_seed(i)) for i, q in enumerate(prompts)]).float()
    t = torch.tensor([250, 950, 80])
    cfg = dict(scale=7.5, full_bridge=True, bridge_grid="fixed", bridge_steps=10)
    out = make(CSD, CSDConfig(**cfg), p)(x0, prompts, 0, t=t)
    assert out.nfe == 30
    for b in range(3):
        alone = make(CSD, CSDConfig(**cfg), p)(x0[b:b + 1], prompts[b:b + 1], 0, t=t[b:b + 1])
        assert torch.allclose(out.grad[b], alone.grad[0], atol=1e-5), b
    assert make(CSD, CSDConfig(**cfg), p)(x0, prompts, 0, t=torch.full((3,), 250)).nfe == 9
    views = Views.at([0.0] * 3, [0.0] * 3)
    assert prompt_rows(StepPrompts(prompts, views=views), [0]) is None
    assert torch.allclose(make(CSD, CSDConfig(**cfg), p)(x0, prompts, 0, views=views, t=t).grad, out.grad, atol=1e-5)
    same = CSDConfig(scale=1.0, negative_prompt="a red circle", full_bridge=True, bridge_grid="fixed", bridge_steps=10)
    red = x0[[0, 2]]
    trip = make(CSD, same, p)(red, ["a red circle"] * 2, 0, t=torch.tensor([600, 300]))
    # measured 0.14 of the images' norm: DDIM's discretization at steps of 100 (experiments/exact/bridge_grid.py)
    assert trip.grad.norm() < 0.2 * red.norm(), (trip.grad.norm(), red.norm())
    with pytest.raises(ValueError, match="guidance.bridge_grid='even' is not one of"):
        CSDConfig(bridge_grid="even")


def test_ddim_inversion_then_generation_round_trip(analytic_prior):
    from sdbridge.guidance.inversion import invert

    p = analytic_prior
    g = make(SDS, SDSConfig(scale=1.0), p)
    prompts = ["a blue square"] * 4
    x0 = p.sample("a blue square", 4, torch.Generator().manual_seed(1))
    n = 100
    path = [torch.full((4,), int(v)) for v in torch.linspace(0, 800, n + 1).round()]
    x_t, _ = invert(g, x0, path, prompts, scale=1.0)
    x = x_t
    for i in range(n, 0, -1):
        e = p.predict_eps(x, path[i], [p.encode_text(prompts)])[0]
        a_to = torch.ones(4, 1, 1, 1) if i == 1 else g.alpha_bar(path[i - 1], x)
        x = ddim_step(x, e, g.alpha_bar(path[i], x), a_to)
    assert (x - x0).norm() < 0.04 * x0.norm(), ((x - x0).norm(), x0.norm())  # first-order DDIM error, 100 steps
    assert (x_t - x0).norm() > 0.5 * x0.norm()  # the round trip went somewhere
