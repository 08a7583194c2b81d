"""Parity of sdbridge's DEFAULT ISM (``guidance=ism``) with LucidDreamer's official ISM (issue #13).

Official source read (its re-derivation, shared with the side-by-side benchmark, is
``tests/parity/official/luciddreamer_ism.py``, written from it, not imported):
EnVision-Research/LucidDreamer at commit ``2ecf0936617103107e4b20c34e94d204196f7a44``.

* ``guidance/sd_utils.py``:

  - ``StableDiffusion.__init__`` (l. 57-139): ``scheduler.set_timesteps(num_train_timesteps)`` (1000) and
    ``self.timesteps = flip(scheduler.timesteps)``, i.e. 1, 2, ..., 1000 (SD 2.1's ``steps_offset`` 1, "leading"
    spacing), so index i is timestep i + 1; ``min_step = int(1000 t_range[0])``, ``max_step = int(1000 t_range[1])``,
    ``warmup_step = int(1000 (max_t_range - t_range[1]))``; ``self.alphas = scheduler.alphas_cumprod``.
  - ``add_noise_with_cfg`` (l. 159-215): unless ``is_noisy_latent``, x0 is first noised with the step's noise to
    ``timesteps[ind_prev_t]`` (its second index argument, the START); then at most ``inv_steps`` times: the UNet at
    ``timesteps[cur_ind_t]`` (with ``cfg <= 1`` only on the second half of the inversion embeddings), ``next_ind_t =
    min(cur_ind_t + delta_t, ind_t)``, one ``ddim_step`` from ``timesteps[cur]`` to ``timesteps[next]`` (passed as
    ``-delta_t_``), stop when ``ind_t`` is reached; returns the predictions newest first.
  - ``train_step`` (l. 346-466): noise ``randn + 0.1 randn(1, 4, 1, 1)`` repeated over the batch (l. 362-368);
    ``current_delta_t = int(delta_t + warm_up_rate (delta_t_start - delta_t))`` (l. 375-378); ``ind_t =
    randint(min_step, max_step + int(warmup_step warm_up_rate), (1,))`` (one for the batch), ``ind_prev_t =
    max(ind_t - current_delta_t, 0)`` (l. 380-381); step 1 inverts from ``starting_ind = max(ind_prev_t - xs_delta_t
    xs_inv_steps, 0)`` to ``ind_prev_t`` in strides ``xs_delta_t``, step 2 one stride ``current_delta_t`` to ``ind_t``
    from the noisy x_s; ``target = pred_scores[0][1]``, the prediction at (x_s, s) (l. 393-405); the target UNet call
    on ``[uncond (negative), text]`` at ``t = timesteps[ind_t]`` and ``pred_noise = uncond + guidance_scale (text -
    uncond)`` (l. 408-432); ``w = sqrt((1 - alphas[t]) / alphas[t])``; ``grad = nan_to_num(grad_scale w (pred_noise
    - target))`` (l. 434-438), applied by ``SpecifyGradient`` as the gradient of the latents itself.
  - ``train_step_perpneg`` (l. 224-343): the same, but ``current_delta_t = int(delta_t + ceil(warm_up_rate
    (delta_t_start - delta_t)))`` (l. 250) and the Perp-Neg target.
* ``guidance/sd_step.py`` ``ddim_step`` (l. 62-202): ``prev_timestep = timestep - delta_timestep``; eta 0:
  ``prev = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev) eps``, then ``nan_to_num``.
* ``train.py``: ``embeddings['inverse_text'] = get_text_embeds(inverse_text)``, ``text_z_inverse =
  cat([uncond, inverse_text])`` (so the unconditional inversion uses ``inverse_text``, the target's CFG the negative
  prompt ``uncond``); ``warm_up_rate = 1 - min(iteration / warmup_iter, 1)`` for iterations 1, 2, ...;
  ``grad_scale = guidance_opt.lambda_guidance``.
* ``arguments/__init__.py`` ``GuidanceParams`` (l. 57-109) and ``OptimizationParams`` (l. 148-202); ``configs/*.yaml``.

Conventions bridged here: sdbridge's ``t`` is the timestep itself (official index + 1); sdbridge's step k is the
official iteration k + 1. The sdbridge side is built from its DEFAULT configs (the composed YAML of ``conf/``),
never from values typed here. Everything runs on the tiny random-weight SD (``sdbridge/priors/tiny.py``), the
official side loading the same folder with diffusers alone (UNet, tokenizer, text encoder, DDIMScheduler). fp32,
CPU, tolerance 1e-4 relative. The 3D presets' view conditioning (``train.py``: each camera's interpolated view
embedding; ``get_pos_neg_text_embeddings`` and ``perpneg_utils.weighted_perpendicular_aggregator`` for the configs
with perpneg) is compared at 8 azimuths. Not compared here: the VAE encode (the official ``encode_imgs`` samples the
posterior; the guidance starts from latents here) and ``augmentation`` (the random flip of the renders:
``target.random_flip``, tests/unit/test_nerf.py).
"""

from __future__ import annotations

import pytest
import torch

from sdbridge.config import to_objects
from sdbridge.guidance import ISM, Guidance, build_guidance
from sdbridge.priors.tiny import TinySDConfig, ensure_tiny_sd
from sdbridge.schedules import build_schedule
from tests.conftest import compose
from tests.parity.official.luciddreamer_ism import (OFFICIAL_ANNEALING_INTERVALS, OFFICIAL_C_BATCH_SIZE,
                                                    OFFICIAL_DELTA_T, OFFICIAL_DELTA_T_START,
                                                    OFFICIAL_DENOISE_GUIDANCE_SCALE, OFFICIAL_FLIP_P,
                                                    OFFICIAL_GUIDANCE_SCALE, OFFICIAL_INVERSE_TEXT,
                                                    OFFICIAL_ITERATIONS, OFFICIAL_LAMBDA_GUIDANCE,
                                                    OFFICIAL_MAX_T_RANGE, OFFICIAL_NEGATIVE, OFFICIAL_NOISE_OFFSET,
                                                    OFFICIAL_RESOLUTION, OFFICIAL_T_RANGE, OFFICIAL_WARMUP_ITER,
                                                    OFFICIAL_XS_DELTA_T, OFFICIAL_XS_ETA, OFFICIAL_XS_INV_STEPS,
                                                    OfficialISM, official_current_delta_t, official_warm_up_rate)
from tests.parity.test_sdi_parity import composed  # the run config `python run.py <overrides>` composes, tiny SD

TOL = 1e-4  # relative error: ||sdbridge - official|| / ||official||
COMMIT = "2ecf0936617103107e4b20c34e94d204196f7a44"

# ---------------------------------------------------------------- constants typed from the official code
# configs/<name>.yaml: (text, negative, delta_t, perpneg)
OFFICIAL_CONFIGS = {
    "axe": ("Viking axe, fantasy, weapon, blender, 8k, HDR.",
            "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, low-resolution, oversaturation.",
            25, False),
    "bagel": ("a DSLR photo of a bagel filled with cream cheese and lox.",
              "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, "
              "oversaturation.", 80, False),
    "cat_armor": ("a DSLR photo of a cat wearing armor.",
                  "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, low-resolution, "
                  "oversaturation.", 80, True),
    "crown": ("a DSLR photo of the Imperial State Crown of England.", "unrealistic, blurry, low quality.", 80, False),
    "football_helmet": ("a DSLR photo of a football helmet.",
                        "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, low-resolution, "
                        "oversaturation.", 50, False),
    "hamburger": ("A delicious hamburger.",
                  "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, "
                  "oversaturation.", 50, False),
    "white_hair_ironman": ("A portrait of IRONMAN, white hair, head, photorealistic, 8K, HDR.",
                           "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, low-resolution.",
                           50, True),
    "zombie_joker": ("Zombie JOKER, head, photorealistic, 8K, HDR.",
                     "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, "
                     "oversaturation.", 50, True),
}  # ts_lora.yaml (delta_t 80, perpneg, a LoRA of a person) has no preset: sdbridge loads no LoRA into the prior

PROMPTS = ["a DSLR photo of a dolphin", "a photograph of a red car"]
NEGATIVE = OFFICIAL_CONFIGS["bagel"][1]


def rel_err(ours: torch.Tensor, official: torch.Tensor) -> float:
    return float((ours.double() - official.double()).norm() / official.double().norm())


# ---------------------------------------------------------------- fixtures and builders
@pytest.fixture(scope="module")
def official(tiny_prior, tiny_cache) -> OfficialISM:
    # The same folder TinySDPrior loads (tiny_prior built it); the official side reads it with diffusers alone.
    return OfficialISM(ensure_tiny_sd(TinySDConfig(cache_dir=str(tiny_cache))))


def guidance_from(overrides: tuple[str, ...], prior, tiny_cache, seed: int = 0) -> Guidance:
    run = composed(overrides, str(tiny_cache))
    g = build_guidance(run.guidance, prior, build_schedule(run.scheduler, prior.num_train_timesteps),
                       torch.Generator().manual_seed(seed), run.target.view_prompting())
    g.setup(run.trainer.max_steps)
    assert isinstance(g, ISM)
    return g.to(prior.device)


def inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and the official kind of noise (randn + 0.1 randn(1, 4, 1, 1) shared by the batch)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 8, 8)  # the tiny SD's latents
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return x0, noise + OFFICIAL_NOISE_OFFSET * torch.randn((1, 4, 1, 1), generator=gen).repeat(batch, 1, 1, 1)


def sdbridge_grad(g: Guidance, x0, prompts, step, t, noise, views=None):
    x = x0.clone().requires_grad_(True)
    out = g(x, prompts, step, views=views, t=t, noise=noise)
    (loss_grad,) = torch.autograd.grad(out.loss, x)
    # the surrogate loss backpropagates the gradient up to the rounding of x0 - (x0 - grad) in fp32
    assert float((loss_grad - out.grad).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(x0.abs().max() + 1)
    assert torch.equal(out.t, t)
    return out


# official ind_t (one per batch) and sdbridge steps: ind_t 20 clamps ind_prev_t to 0 (s = 1, no stride below s),
# 450 inverts 0 -> 200 -> 400 -> s, 978 is the largest index at iteration 1 (five strides)
CASES = [(20, 0), (450, 0), (450, 749), (978, 0), (333, 1499), (499, 4999)]


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("ind_t, step", CASES)
def test_default_ism_matches_official(ind_t, step, tiny_prior, tiny_cache, official):
    """``guidance=ism`` with its defaults (negative prompt "") = the official train_step with the code's defaults
    and lambda_guidance 0.1, at sdbridge step k = official iteration k + 1; also the NFEs and the timesteps at
    which the UNet inverts."""
    g = guidance_from(("guidance=ism",), tiny_prior, tiny_cache)
    x0, noise = inputs(2, seed=ind_t)
    evaluated: list[int] = []
    ref, t_official = official.grad_for(x0, PROMPTS, OFFICIAL_NEGATIVE, ind_t, noise,
                                          official_warm_up_rate(step + 1), evaluated=evaluated)
    assert t_official == ind_t + 1
    out = sdbridge_grad(g, x0, PROMPTS, step, torch.full((2,), t_official), noise)
    err = rel_err(out.grad, ref)
    print(f"PARITY ism default ind_t={ind_t} step={step}: rel err {err:.1e}, official UNet inversion at {evaluated}")
    assert err <= TOL
    # one UNet call per official inversion step + 2 for the CFG; when ind_prev_t = 0 (s = 1) the official step 1 is
    # an identity step that evaluates the UNet at timestep 1 as its step 2 does again: sdbridge skips that repeat
    assert out.nfe == len(set(evaluated)) + 2
    assert len(evaluated) == len(set(evaluated)) + (ind_t - out.extras["delta_t"] <= 0)
    assert out.extras["delta_t"] == official_current_delta_t(official_warm_up_rate(step + 1), OFFICIAL_DELTA_T, False)


@pytest.mark.parametrize("preset", ["bagel", "hamburger", "axe"])
def test_preset_ism_matches_official_config(preset, tiny_prior, tiny_cache, official):
    """``experiment=ism_<config>``'s guidance (its negative prompt in the target CFG only, its delta_t) = the
    official train_step with configs/<config>.yaml, during and after the warm-up."""
    g = guidance_from((f"experiment=ism_{preset}",), tiny_prior, tiny_cache)
    _, negative, delta_t, perpneg = OFFICIAL_CONFIGS[preset]
    assert not perpneg
    x0, noise = inputs(2, seed=7)
    for ind_t, step in [(600, 10), (130, 2000)]:
        ref, t = official.grad_for(x0, PROMPTS, negative, ind_t, noise, official_warm_up_rate(step + 1), delta_t)
        out = sdbridge_grad(g, x0, PROMPTS, step, torch.full((2,), t), noise)
        err = rel_err(out.grad, ref)
        print(f"PARITY ism experiment=ism_{preset} ind_t={ind_t} step={step}: rel err {err:.1e}")
        assert err <= TOL


# cameras at LucidDreamer's delta_azimuth: front, front-side, the front/side boundary (-90), side-back, back, and the
# Perp-Neg weight cuts (r > 0.8 at |a| < 18, r < 0.2 at |a| > 72)
AZIMUTHS = [0.0, 10.0, -35.0, 80.0, -90.0, 100.0, -150.0, 180.0]


@pytest.mark.parametrize("preset", ["bagel", "cat_armor"])
def test_3d_preset_view_conditioning_matches_official(preset, tiny_prior, tiny_cache, official):
    """``experiment=ism_<config>`` seen from 8 cameras = the official ``train_step`` (bagel: perpneg false, each
    camera on its interpolated view embedding) or ``train_step_perpneg`` (cat_armor: the interpolated positive, the
    two other views subtracted perpendicularly with LucidDreamer's weights, delta_t's warm-up rounded up)."""
    from sdbridge.views import Views

    g = guidance_from((f"experiment=ism_{preset}",), tiny_prior, tiny_cache)
    _, negative, delta_t, perpneg = OFFICIAL_CONFIGS[preset]
    B = len(AZIMUTHS)
    prompts = [PROMPTS[i % 2] for i in range(B)]
    x0, noise = inputs(B, seed=11)
    views = Views.at([0.0] * B, AZIMUTHS)
    for ind_t, step in [(600, 10), (130, 2000)]:
        ref, t = official.grad_for(x0, prompts, negative, ind_t, noise, official_warm_up_rate(step + 1), delta_t,
                                     azimuths=AZIMUTHS, perpneg=perpneg)
        out = sdbridge_grad(g, x0, prompts, step, torch.full((B,), t), noise, views=views)
        err = rel_err(out.grad, ref)
        print(f"PARITY ism experiment=ism_{preset} views ind_t={ind_t} step={step}: rel err {err:.1e}, NFE {out.nfe}")
        assert err <= TOL
    # threestudio's view scheme (suffix of the nearest view, its Perp-Neg weights) is not LucidDreamer's
    g_ts = guidance_from((f"experiment=ism_{preset}", "target.view_scheme=threestudio"), tiny_prior, tiny_cache)
    drift = rel_err(sdbridge_grad(g_ts, x0, prompts, 10, torch.full((B,), t), noise, views=views).grad,
                    official.grad_for(x0, prompts, negative, 130, noise, official_warm_up_rate(11), delta_t,
                                        azimuths=AZIMUTHS, perpneg=perpneg)[0])
    print(f"PARITY ism experiment=ism_{preset} target.view_scheme=threestudio: rel err {drift:.1e}")
    assert drift > 10 * TOL


# sdbridge's earlier ISM choices, each an option: the official gradient differs from them
EARLIER = {
    "invert_with_negative": ("guidance.invert_with_negative=true",),
    "clean_start": ("guidance.noised_start=false",),
    "fixed_delta_t": ("guidance.delta_t_warmup_steps=0",),
    "no_lambda": ("guidance.lambda_guidance=1.0",),
}


@pytest.mark.parametrize("option", sorted(EARLIER))
def test_earlier_choices_differ_from_official(option, tiny_prior, tiny_cache, official):
    """Each option that restores an earlier sdbridge choice moves the gradient away from the official one (so the
    parity above is not vacuous)."""
    g = guidance_from(("experiment=ism_bagel", *EARLIER[option]), tiny_prior, tiny_cache)
    x0, noise = inputs(2, seed=3)
    ind_t, step = 450, 100
    ref, t = official.grad_for(x0, PROMPTS, NEGATIVE, ind_t, noise, official_warm_up_rate(step + 1))
    out = sdbridge_grad(g, x0, PROMPTS, step, torch.full((2,), t), noise)
    err = rel_err(out.grad, ref)
    print(f"EARLIER ism {option}: rel err to official {err:.1e}")
    assert err > 100 * TOL


# ---------------------------------------------------------------- t and delta_t schedules
@pytest.mark.parametrize("perpneg", [False, True])
def test_delta_t_per_step_matches_official(perpneg, tiny_prior, tiny_cache):
    """delta_t at every step of the 5000: 100 -> delta_t over the first 1500 iterations, truncated (train_step) or
    with the warm-up term rounded up (train_step_perpneg: the configs with perpneg: true)."""
    presets = [n for n, c in OFFICIAL_CONFIGS.items() if c[3] == perpneg]
    for name in presets + (["default"] if not perpneg else []):
        overrides = ("guidance=ism",) if name == "default" else (f"experiment=ism_{name}",)
        delta_t = OFFICIAL_DELTA_T if name == "default" else OFFICIAL_CONFIGS[name][2]
        g = guidance_from(overrides, tiny_prior, tiny_cache)
        ours = [g.delta_t(k) for k in range(OFFICIAL_ITERATIONS)]
        ref = [official_current_delta_t(official_warm_up_rate(i), delta_t, perpneg)
               for i in range(1, OFFICIAL_ITERATIONS + 1)]
        bad = [k for k in range(OFFICIAL_ITERATIONS) if ours[k] != ref[k]]
        assert not bad, f"{name}: delta_t differs at steps {bad[:5]}: ours {[ours[k] for k in bad[:5]]}, " \
                        f"official {[ref[k] for k in bad[:5]]}"
        assert ref[0] == OFFICIAL_DELTA_T_START - (0 if perpneg else 1) and ref[OFFICIAL_WARMUP_ITER - 1] == delta_t


def test_timestep_support_per_step_matches_official(tiny_prior, tiny_cache, official):
    """At every step of the 5000 the default schedule draws from exactly the official support
    ``timesteps[randint(min_step, max_step + int(warmup_step warm_up_rate))]``: {21..979} at iteration 1,
    {21..500} from iteration 1500 on."""
    g = guidance_from(("guidance=ism",), tiny_prior, tiny_cache)
    for k in range(OFFICIAL_ITERATIONS):
        low, high = official.ind_t_bounds(official_warm_up_rate(k + 1))
        ref = official.timesteps[low:high]
        ours = g.schedule.candidates(k)
        assert torch.equal(ours, ref.to(ours)), f"step {k}: ours [{ours.min()}, {ours.max()}], official " \
                                                f"[{ref.min()}, {ref.max()}]"
    assert official.timesteps[official.ind_t_bounds(official_warm_up_rate(1))[1] - 1] == 979
    assert g.schedule.candidates(OFFICIAL_WARMUP_ITER - 1).max() == 500


@pytest.mark.parametrize("step", [0, 749, 4999])
def test_one_uniform_timestep_per_batch(step, tiny_prior, tiny_cache, official):
    """One t for the batch (torch.randint(..., (1,))), uniform over the official support."""
    g = guidance_from(("guidance=ism",), tiny_prior, tiny_cache, seed=step)
    draws = torch.stack([g.sample_timesteps(step, 3) for _ in range(20_000)])
    assert bool((draws == draws[:, :1]).all())
    low, high = official.ind_t_bounds(official_warm_up_rate(step + 1))
    support = official.timesteps[low:high]
    counts = torch.bincount(draws[:, 0], minlength=1001)[support].double()
    assert counts.sum() == len(draws)
    expected = len(draws) / len(support)
    chi2, dof = float(((counts - expected) ** 2 / expected).sum()), len(support) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"t is not uniform on the support (chi2 = {chi2:.0f}, dof = {dof})"


def test_noise_has_the_official_shared_offset(tiny_prior, tiny_cache):
    """noise = randn + 0.1 randn(1, C, 1, 1) repeated over the batch: the per-channel mean of a sample has variance
    1 / HW + 0.01, and the offset cancels between two samples of one batch (variance 2 / HW)."""
    g = guidance_from(("guidance=ism",), tiny_prior, tiny_cache, seed=1)
    like = torch.zeros(2, 4, 8, 8)
    means = torch.stack([g.sample_noise(like).mean(dim=(2, 3)) for _ in range(4000)]).double()  # (n, 2, C)
    hw = 64
    var_one = float(means[:, 0].var())
    var_diff = float((means[:, 0] - means[:, 1]).var())
    print(f"NOISE per-channel mean var {var_one:.4f} (official {1 / hw + OFFICIAL_NOISE_OFFSET ** 2:.4f}), "
          f"between samples {var_diff:.4f} (official {2 / hw:.4f})")
    assert abs(var_one / (1 / hw + OFFICIAL_NOISE_OFFSET ** 2) - 1) < 0.08
    assert abs(var_diff / (2 / hw) - 1) < 0.08


# ---------------------------------------------------------------- our resolved config
def test_resolved_default_config_has_the_official_values(tiny_cache):
    run = composed(("guidance=ism",), str(tiny_cache))
    g, s = run.guidance, run.scheduler
    assert (g.scale, g.lambda_guidance) == (OFFICIAL_GUIDANCE_SCALE, OFFICIAL_LAMBDA_GUIDANCE)
    assert g.weighting.name == "sigma"  # w = sqrt((1 - abar) / abar)
    assert (g.delta_t, g.delta_t_start, g.delta_t_ceil) == (OFFICIAL_DELTA_T, OFFICIAL_DELTA_T_START, False)
    assert (g.delta_t_warmup_steps > 0) == OFFICIAL_ANNEALING_INTERVALS
    assert g.delta_t_warmup_steps == OFFICIAL_WARMUP_ITER
    assert (g.inversion_stride, g.inversion_steps) == (OFFICIAL_XS_DELTA_T, OFFICIAL_XS_INV_STEPS)
    assert (g.inversion_text, g.invert_with_negative, g.negative_prompt) == (OFFICIAL_INVERSE_TEXT, False,
                                                                              OFFICIAL_NEGATIVE)
    assert (g.noised_start, g.offset_noise, g.full_bridge) == (True, OFFICIAL_NOISE_OFFSET, False)
    assert type(s).__name__ == "ShrinkingMaxConfig"
    assert (s.min_step_ratio, s.max_step_ratio, s.max_step_ratio_start) == (*OFFICIAL_T_RANGE, OFFICIAL_MAX_T_RANGE)
    assert (s.warmup_steps, s.index_offset, s.per_sample) == (OFFICIAL_WARMUP_ITER, 1, False)
    assert OFFICIAL_XS_ETA == 0.0 and OFFICIAL_DENOISE_GUIDANCE_SCALE == 1.0  # what sdbridge's ISM implements


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_resolved_presets_have_the_official_config_values(name, tiny_cache):
    text, negative, delta_t, perpneg = OFFICIAL_CONFIGS[name]
    run = to_objects(compose([f"experiment=ism_{name}"]))
    g, s = run.guidance, run.scheduler
    assert run.prompt.texts == [text] and run.prompt.repeat == 1 and type(run.prior).__name__ == "StableDiffusionConfig"
    assert run.prior.model == "stabilityai/stable-diffusion-2-1-base"
    assert (g.negative_prompt, g.delta_t, g.delta_t_ceil, run.target.perp_neg) == (negative, delta_t, perpneg, perpneg)
    assert (g.scale, g.lambda_guidance, g.delta_t_start, g.delta_t_warmup_steps) == (
        OFFICIAL_GUIDANCE_SCALE, OFFICIAL_LAMBDA_GUIDANCE, OFFICIAL_DELTA_T_START, OFFICIAL_WARMUP_ITER)
    assert (g.inversion_stride, g.inversion_steps, g.inversion_text) == (OFFICIAL_XS_DELTA_T, OFFICIAL_XS_INV_STEPS,
                                                                        OFFICIAL_INVERSE_TEXT)
    assert (s.min_step_ratio, s.max_step_ratio, s.max_step_ratio_start, s.warmup_steps) == (
        *OFFICIAL_T_RANGE, OFFICIAL_MAX_T_RANGE, OFFICIAL_WARMUP_ITER)
    assert run.trainer.max_steps == OFFICIAL_ITERATIONS and run.target.cameras.batch_size == OFFICIAL_C_BATCH_SIZE
    assert run.target.resolutions == [OFFICIAL_RESOLUTION]
    # train.py's view conditioning (interpolated view embeddings; its Perp-Neg where perpneg) and sd_utils.py's
    # augmentation (T.RandomHorizontalFlip(p=0.5))
    assert run.target.view_dependent_prompts and run.target.view_scheme.name == "luciddreamer"
    assert run.target.random_flip == OFFICIAL_FLIP_P

