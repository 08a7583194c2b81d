"""Speed options change how fast a gradient is computed, never which gradient (within stated tolerances), and a
batched multi-caption step equals the per-caption steps. Timings live in experiments/bench, not here."""

from __future__ import annotations

import json

import pytest
import torch

from sdbridge.guidance import build_guidance
from sdbridge.rng import SampleGenerators
from sdbridge.schedules import build_schedule
from tests.conftest import compose

PROMPTS = ["a dog", "a red car", "a bowl of fruit"]


def _prior(tiny_cache, *overrides):
    from sdbridge.config import to_objects
    from sdbridge.priors import build_prior

    config = to_objects(compose(["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu", *overrides]))
    return build_prior(config.prior)


def _guidance(prior, method: str, generator, overrides: list[str] | None = None):
    from sdbridge.config import to_objects

    config = to_objects(compose([f"guidance={method}", "prior=tiny_sd", *(overrides or [])]))
    g = build_guidance(config.guidance, prior, build_schedule(config.scheduler, prior.num_train_timesteps), generator)
    g.setup(1000)
    g.prepare(PROMPTS)
    return g


def _sds_grad(prior) -> torch.Tensor:
    g = _guidance(prior, "sds", torch.Generator().manual_seed(0))
    x0 = torch.randn(3, *prior.sample_shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    return g(x0, PROMPTS, 0, t=torch.tensor([100, 500, 900]), noise=noise).grad


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


#: option -> (overrides, max relative L2 error of the SDS gradient against plain fp32)
SPEED_OPTIONS = {
    "channels_last": (["prior.channels_last=true"], 1e-4),  # same math, other memory order: fp32 rounding only
    "classic attention": (["prior.attention=classic"], 1e-4),  # softmax(QK^T)V by hand vs PyTorch SDPA
    # half precision: SDS at CFG 40 multiplies the rounding error of eps_cond - eps_uncond by 40
    "float16": (["prior.dtype=float16"], 3e-2),  # 11-bit mantissa (measured 1.4e-2 on the tiny SD)
    "bfloat16": (["prior.dtype=bfloat16"], 1.5e-1),  # 8-bit mantissa: the loosest
}


@pytest.mark.parametrize("option", list(SPEED_OPTIONS))
def test_speed_option_gives_the_plain_gradient(tiny_cache, tiny_prior, option):
    overrides, tolerance = SPEED_OPTIONS[option]
    plain = _sds_grad(tiny_prior)
    fast = _sds_grad(_prior(tiny_cache, *overrides))
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    print(f"{option}: relative error {_relative_error(fast, plain):.2e}")
    assert _relative_error(fast, plain) <= tolerance, _relative_error(fast, plain)


@pytest.mark.slow
def test_torch_compile_gives_the_plain_gradient(tiny_cache, tiny_prior):
    """torch.compile (inductor, CPU here) fuses kernels: the gradient agrees to float rounding."""
    fast = _sds_grad(_prior(tiny_cache, "prior.compile=true"))
    assert _relative_error(fast, _sds_grad(tiny_prior)) <= 1e-4


def test_direct_attention_gives_the_stock_outputs_and_lora_gradients(tiny_cache):
    """The prior's attention layers skip diffusers' per-call signature inspection (``direct_attention``): UNet outputs
    (LoRA adapters on, non-zero), the LoRA gradients and VAE decodes are bitwise those of the stock forward, and a
    call with extra attention keyword arguments still runs the stock forward."""
    from diffusers.models.attention_processor import Attention

    from sdbridge.priors.stable_diffusion import direct_attention

    prior = _prior(tiny_cache)
    routed = [m for m in prior.unet.modules() if isinstance(m, Attention)]
    assert routed and all("forward" in m.__dict__ for m in routed)
    assert any("forward" in m.__dict__ for m in prior.vae.modules() if isinstance(m, Attention))
    params = prior.add_lora("check", rank=2, gaussian_init=True)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, *prior.sample_shape, generator=g), torch.randn(2, 77, 32, generator=g)
    t, z = torch.tensor([300, 700]), torch.randn(2, *prior.sample_shape, generator=g)

    def outputs():
        for p in params:
            p.grad = None
        with prior.adapter("check"):
            out = prior.unet(x, t, encoder_hidden_states=emb).sample
            out.square().sum().backward()
        with torch.no_grad():
            image = prior.vae.decode(z).sample
        return [out.detach(), image, *(p.grad for p in params)]

    direct = outputs()
    assert direct_attention(prior.unet, on=False) == len(routed) and direct_attention(prior.vae, on=False) > 0
    assert not any("forward" in m.__dict__ for m in routed)
    stock = outputs()
    assert all(torch.equal(a, b) for a, b in zip(direct, stock))
    direct_attention(prior.unet)
    layer = routed[0]
    h = torch.randn(1, 4, layer.to_q.in_features, generator=g)
    with torch.no_grad():
        assert torch.equal(layer(h, ip_adapter_masks=None), Attention.forward(layer, h))


@pytest.mark.parametrize("method", ["sds", "nfsd", "csd", "bridge", "sdi", "ism", "vsd"])
def test_batched_multi_caption_step_equals_the_per_caption_steps(tiny_prior, method):
    """With one generator per caption, one step on 3 captions gives each caption the gradient of its own step
    (noise, t, SDI's jitter and inversion noise all drawn per caption)."""
    keys = ["11", "22", "33"]
    x0 = torch.randn(3, *tiny_prior.sample_shape, generator=torch.Generator().manual_seed(5))
    together = _guidance(tiny_prior, method, SampleGenerators(7, keys))(x0, PROMPTS, 3)
    nfes = []
    for i, key in enumerate(keys):
        alone = _guidance(tiny_prior, method, SampleGenerators(7, [key]))(x0[i : i + 1], PROMPTS[i : i + 1], 3)
        assert torch.equal(together.t[i : i + 1], alone.t)
        # fp32 kernels over batch 3 vs 1 round differently; the CFG scale (up to 40) and SDI's 10 inversion steps
        # amplify that to ~1e-5 of the gradient's norm
        assert _relative_error(together.grad[i : i + 1], alone.grad) <= 1e-4
        nfes.append(alone.nfe)
    # an NFE is one batched call per conditioning: a batch costs the calls of its longest sample (ISM and SDI
    # invert each sample to its own t; shorter paths are padded)
    assert together.nfe == max(nfes)


def test_quick_benchmark_writes_its_tables(tmp_path):
    """The harness's CPU smoke run: every method at batch 1 and 4, one table row each (numbers not asserted)."""
    from experiments.bench.run import ALL_METHODS, main

    out = tmp_path / "bench.json"
    assert main(["--quick", "--methods", "sds", "sdi", "vsd", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for b in (1, 4) for m in ("sds", "sdi", "vsd")]
    for r in rows:
        assert r["ms_per_iter"] > 0 and r["denoiser_ms"] > 0 and r["overhead"] > 0 and r["images_per_hour"] > 0
        assert r["nfe_per_iter"] >= 2
    assert set(ALL_METHODS) >= {"sds", "sdi", "vsd"}


def test_sd21_base_random_has_the_published_architecture():
    """Built on the meta device (shapes only): the parameter counts of SD 2.1 base's UNet, VAE and text encoder."""
    from sdbridge.config import to_objects
    from sdbridge.priors import RandomSDConfig
    from sdbridge.priors.random_sd import build_random_sd21_base

    parts = build_random_sd21_base("meta")
    counts = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    assert parts["unet"].config.cross_attention_dim == parts["text_encoder"].config.hidden_size == 1024
    assert len(parts["tokenizer"]) == 49408
    config = to_objects(compose(["prior=sd21_base_random"])).prior
    assert isinstance(config, RandomSDConfig) and config.attention == "sdpa"
    with pytest.raises(ValueError, match="prior.attention='flash3'"):
        RandomSDConfig(attention="flash3")


def test_sd21_base_random_serves_a_reduced_latent_size():
    """``prior.latent_size`` shrinks the feature maps, never the weights (the CPU overhead benchmark's 4x24x24)."""
    from sdbridge.config import to_objects
    from sdbridge.priors import RandomSDConfig
    from sdbridge.priors.random_sd import build_random_sd21_base

    unet = build_random_sd21_base("meta", latent_size=24)["unet"]
    assert unet.config.sample_size == 24 and sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert to_objects(compose(["prior=sd21_base_random", "prior.latent_size=24"])).prior.latent_size == 24
    for bad in (20, 0):
        with pytest.raises(ValueError, match=f"prior.latent_size={bad} must be a positive multiple of 8"):
            to_objects(compose(["prior=sd21_base_random", f"prior.latent_size={bad}"]))


def test_bench_readme_blocks_are_replaced_in_place(tmp_path):
    """The benchmark scripts' --readme: a block is replaced where it stands (or appended), the command shown above it
    leaves out where a copy or a record was written (gpu.sh --dry-run's temporary README, --json), and each block is
    keyed by device, prior and scale, so that a GPU table never replaces a CPU one."""
    from experiments.bench.readme import block_key, command_line, write_block

    readme = tmp_path / "README.md"
    readme.write_text("# Bench\n\n<!-- bench:a:start -->\nold\n<!-- bench:a:end -->\n\ntail\n")
    write_block(readme, "bench:a", "new")
    write_block(readme, "bench:b", "appended")
    assert readme.read_text() == ("# Bench\n\n<!-- bench:a:start -->\nnew\n<!-- bench:a:end -->\n\ntail\n\n"
                                  "<!-- bench:b:start -->\nappended\n<!-- bench:b:end -->\n")
    argv = ["--readme", "--readme-path", "/tmp/x/README.md", "--variants", "classic attention", "--readme-path=/tmp/y",
            "--json", "/tmp/rows.json", "--out=/tmp/o.json", "--steps", "12"]
    assert command_line("experiments/bench/run.py", argv) == \
        "python experiments/bench/run.py --readme --variants 'classic attention' --steps 12"
    assert block_key("cpu", "tiny_sd") == "cpu-tiny_sd"
    assert block_key("cuda", "sd21_base_random") == "gpu-sd21_base_random"
    assert block_key("cpu", "sd21_base_random", 16, quick=True) == "cpu-sd21_base_random-latent16-quick"


def test_vsd_on_the_prior_and_sdi_keep_no_second_unet(tiny_prior):
    """With ``guidance.lora_base=prior`` VSD's source is LoRA adapters on the prior's own UNet (plus a camera
    embedding); SDI only inverts with it. Neither registers a UNet in the guidance (checkpoints stay small)."""
    from diffusers import UNet2DConditionModel

    unet_size = sum(p.numel() for n, p in tiny_prior.unet.named_parameters() if "sdbridge_vsd" not in n)
    for method, overrides in (("vsd", ["guidance.lora_base=prior"]), ("sdi", [])):
        g = _guidance(tiny_prior, method, torch.Generator().manual_seed(0), overrides)
        g(torch.randn(1, *tiny_prior.sample_shape), PROMPTS[:1], 0)
        assert not any(isinstance(m, UNet2DConditionModel) for m in g.modules())
        own = sum(p.numel() for p in g.parameters())
        assert own < 0.25 * unet_size, (method, own, unet_size)  # tiny SD: LoRA rank 4 + camera MLP vs the UNet
        if method == "vsd":
            assert g.source.model is tiny_prior


def test_vsd_default_lora_base_is_a_second_unet_outside_the_checkpoint(tiny_prior):
    """The official LoRA base (SD 2.1, v-prediction; on the tiny prior its tiny stand-in) is a second UNet, loaded
    beside the prior and kept out of the guidance's modules; only the LoRA and camera weights are guidance state."""
    from diffusers import UNet2DConditionModel

    g = _guidance(tiny_prior, "vsd", torch.Generator().manual_seed(0))
    g(torch.randn(1, *tiny_prior.sample_shape), PROMPTS[:1], 0)
    assert g.source.model is not tiny_prior and g.source.model.unet is not tiny_prior.unet
    assert g.source.model.prediction_type == "v_prediction"
    assert g.source.model.text_encoder is tiny_prior.text_encoder  # one text encoder for both UNets
    assert not any(isinstance(m, UNet2DConditionModel) for m in g.modules())
    prior_params = {id(p) for p in tiny_prior.unet.parameters()}  # (a session prior may hold another run's adapters)
    assert g.source.lora_parameters() and not any(id(p) in prior_params for p in g.source.lora_parameters())
