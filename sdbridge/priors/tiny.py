"""A tiny random-weight Stable Diffusion, built offline from configs with the real diffusers/transformers classes.

It is saved with ``save_pretrained`` into a cache folder and loaded back through exactly the
:class:`~sdbridge.priors.stable_diffusion.StableDiffusionPrior` code path, so every SD-path test (and the CPU demo)
exercises the loading, tokenizing, CFG batching, VAE and v-prediction code that real users run on SD 2.1.

Architecture: UNet2DConditionModel (channels 32/64, cross-attention on the second level, linear projections as in
SD 2.x), AutoencoderKL with four blocks (SD's 8x downsampling, 4 latent channels), a 2-layer CLIP text model, and
the real CLIP BPE tokenizer. The tokenizer's vocabulary is rebuilt from the OpenAI BPE merges file that the
``open_clip_torch`` package ships (``bpe_simple_vocab_16e6.txt.gz``), the same construction as CLIP's
``SimpleTokenizer``: 256 byte tokens, their ``</w>`` forms, 48,894 merges and two specials = 49,408 tokens.

Deterministic: the same ``seed`` gives the same weights, bit for bit. The cache folder records every file's size and
SHA-256 (``sdbridge_tiny.json``); a folder that no longer matches them is rebuilt with a one-line warning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from sdbridge.priors import cache
from sdbridge.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
from sdbridge.registry import builds

#: Bumped whenever the architecture below changes, so stale caches are rebuilt.
TINY_SD_VERSION = 1
#: the cache folder's record of its build: spec, and every file's size and SHA-256 (``files``)
MANIFEST = "sdbridge_tiny.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49,408-token BPE vocabulary and merges, built from open_clip's bundled merges file."""
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - open_clip_torch is a pinned dependency
        raise ImportError("the tiny SD prior needs open_clip_torch for CLIP's BPE merges: pip install open-clip-torch") from err
    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab_list = byte_tokens + [b + "</w>" for b in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, [tuple(m.split()) for m in merges]


@dataclass
class TinySDConfig(StableDiffusionConfig):
    """Random-weight SD built on first use and cached in ``cache_dir`` (``prior=tiny_sd``)."""

    model: str = "tiny_sd"
    cache_dir: str = "~/.cache/sdbridge/tiny_sd"
    seed: int = 0
    latent_size: int = 8  # latents 4 x 8 x 8, images 64 x 64
    prediction_type: str = "epsilon"  # or "v_prediction", to exercise SD 2.x's v-models


def _spec(config: TinySDConfig) -> dict:
    return {
        "version": TINY_SD_VERSION,
        "seed": config.seed,
        "latent_size": config.latent_size,
        "prediction_type": config.prediction_type,
    }


def tiny_sd_folder(config: TinySDConfig) -> Path:
    spec = _spec(config)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return Path(os.path.expanduser(config.cache_dir)) / f"tiny_sd-{digest}"


def build_tiny_sd(folder: Path, seed: int = 0, latent_size: int = 8, prediction_type: str = "epsilon") -> Path:
    """Build the tiny pipeline with random weights and ``save_pretrained`` it into ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prior.prediction_type={prediction_type!r} is not one of ['epsilon', 'v_prediction']")
    vocab, merges = clip_vocab_and_merges()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=latent_size * 8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so a killed build never leaves a half-written cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): cache.digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(
            json.dumps({"seed": seed, "latent_size": latent_size, "prediction_type": prediction_type,
                        "version": TINY_SD_VERSION, "files": files}, indent=2)
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


#: :func:`verify_tiny_sd`'s answer for a cache built before checksums were recorded (rebuilt once, without a warning)
NO_CHECKSUMS = "built before checksums were recorded"


def verify_tiny_sd(folder: Path) -> str | None:
    """Why the cached tiny SD in ``folder`` cannot be used (``None``: every file matches the size and SHA-256
    recorded in its manifest when it was built)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return NO_CHECKSUMS
    for name, recorded in manifest["files"].items():
        problem = cache.mismatch(folder / name, recorded)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def ensure_tiny_sd(config: TinySDConfig) -> Path:
    """Folder of the cached tiny SD for this config, building it first if needed; a cache whose files do not match
    their recorded checksums (truncated, garbled) is rebuilt with a one-line warning, one built before checksums
    were recorded is rebuilt once."""
    folder = tiny_sd_folder(config)
    if (folder / MANIFEST).is_file():
        problem = verify_tiny_sd(folder)
        if problem is None:
            return folder
        cache.warn_rebuild("tiny-SD", folder, problem, recorded=problem != NO_CHECKSUMS)
    build_tiny_sd(folder, config.seed, config.latent_size, config.prediction_type)
    return folder


#: Hub models the tiny SD stands in for, with their prediction types: ``companion(model)`` on the tiny prior builds a
#: tiny random SD of that prediction type (another seed: another model) instead of downloading the real one.
TINY_STAND_INS = {
    "stabilityai/stable-diffusion-2-1": "v_prediction",  # VSD's official LoRA base
    "stabilityai/stable-diffusion-2-1-base": "epsilon",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "epsilon",
}


@builds("prior", "tiny_sd", TinySDConfig)
class TinySDPrior(StableDiffusionPrior):
    """``prior=tiny_sd``: builds (once) and loads the tiny random SD through the real SD loading path."""

    def __init__(self, config: TinySDConfig):
        super().__init__(config, path=ensure_tiny_sd(config))

    def companion_path(self, model: str) -> Path:
        """A local diffusers folder as it is; a hub id of :data:`TINY_STAND_INS` as a tiny random SD of that model's
        prediction type, seeded ``seed + 1`` (built offline once)."""
        if Path(os.path.expanduser(model)).is_dir() or model.startswith((".", "/", "~")):
            return super().companion_path(model)
        return stand_in_folder(self.config, model)


def stand_in_folder(config: TinySDConfig, model: str) -> Path:
    """The folder of the tiny random SD that stands in for the hub model ``model`` next to the tiny SD of ``config``
    (:data:`TINY_STAND_INS`: that model's prediction type, seed ``seed + 1``), built offline once."""
    if model not in TINY_STAND_INS:
        raise ValueError(f"prior=tiny_sd has no tiny stand-in for {model!r} (known: {sorted(TINY_STAND_INS)}); "
                         "give a local diffusers folder or use a real prior")
    return ensure_tiny_sd(TinySDConfig(cache_dir=config.cache_dir, seed=config.seed + 1,
                                       latent_size=config.latent_size, prediction_type=TINY_STAND_INS[model]))


__all__ = ["TINY_STAND_INS", "TinySDConfig", "TinySDPrior", "build_tiny_sd", "ensure_tiny_sd", "stand_in_folder",
           "tiny_sd_folder", "verify_tiny_sd", "asdict"]
