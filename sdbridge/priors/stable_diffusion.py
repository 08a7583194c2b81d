"""Stable Diffusion 1.x / 2.x as a :class:`~sdbridge.priors.base.DiffusionPrior`, over diffusers.

Components are loaded one by one (tokenizer, text encoder, UNet, VAE, scheduler config) from a hub model id or a
local folder in diffusers' layout, so no safety checker or pipeline object is built. Epsilon- and v-prediction
models are both served as epsilon:

    eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t          (v = sqrt(abar) eps - sqrt(1 - abar) x0)

Weights are fp16 on GPU and fp32 on CPU unless ``dtype`` says otherwise; predictions are returned in float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sdbridge import rng
from sdbridge.priors.base import (
    DiffusionPrior,
    PriorConfig,
    TextEmbedding,
    per_sample,
    resolve_device,
    resolve_dtype,
    scaled_linear_alphas_cumprod,
)
from sdbridge.registry import builds

#: Files fetched for a hub model id: configs, tokenizer files and the default (non-variant) safetensors weights of
#: the five components we use. SD repos also hold multi-GB single-file checkpoints at their root; those are skipped.
COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "unet", "vae")


class PriorUnavailableError(RuntimeError):
    """The model's weights are neither on disk nor downloadable right now."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _unavailable_message(model: str, reason: str) -> str:
    return (
        f"Stable Diffusion weights for {model!r} are not available: {reason}.\n"
        "Fix it with one of:\n"
        f"  * download them once with hub access: `hf download {model}` (then HF_HUB_OFFLINE=1 works);\n"
        "  * point prior.model at a local folder in diffusers' layout (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/);\n"
        "  * run offline on the built-in priors instead: prior=tiny_sd (random-weight SD) or prior=analytic."
    )


def allow_patterns(components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """The hub files of ``components`` (configs, tokenizer files, default safetensors weights)."""
    return ["model_index.json"] + [
        f"{c}/{pattern}"
        for c in components
        for pattern in ("*.json", "*.txt", "diffusion_pytorch_model.safetensors", "model.safetensors")
    ]


def resolve_model_path(model: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                       components: tuple[str, ...] = COMPONENTS) -> Path:
    """Return a local folder holding ``model`` (its ``components``); download it only when the hub is reachable.

    Never hangs offline: with ``HF_HUB_OFFLINE=1`` only the local cache is consulted, and otherwise a download
    attempt uses short connection time-outs.
    """
    expanded = Path(os.path.expanduser(model))
    if expanded.is_dir():
        if not (expanded / "unet").is_dir():
            raise PriorUnavailableError(_unavailable_message(model, f"folder {expanded} has no unet/ subfolder"))
        return expanded
    if model.startswith((".", "/", "~")):
        raise PriorUnavailableError(_unavailable_message(model, f"folder {expanded} does not exist"))

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = allow_patterns(components)

    try:
        return Path(
            snapshot_download(
                model, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as err:
        if is_offline():
            raise PriorUnavailableError(
                _unavailable_message(model, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
            ) from err
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as err:  # network errors, 401/404 for gated or misspelt ids, ...
        raise PriorUnavailableError(_unavailable_message(model, f"download failed ({type(err).__name__}: {err})")) from err


def check_tokenizer(tokenizer: Any, where: Path) -> None:
    """Refuse a tokenizer that would silently map every word to one token.

    transformers can return a near-empty tokenizer when its files are missing offline; every prompt would then
    encode to the same embedding, and guidance would ignore the text without any error.
    """
    ids = tokenizer("a photo of a dog", add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(tokenizer) < 1000 or len(ids) == 0 or all(i == unk for i in ids):
        raise PriorUnavailableError(
            f"the tokenizer loaded from {where} is empty or broken (vocabulary size {len(tokenizer)}, "
            f"'a photo of a dog' -> {ids}); its vocab.json / merges.txt are missing or unreadable"
        )


#: the components whose weights are read from a model folder
WEIGHTED = ("text_encoder", "unet", "vae")


def check_weights_file(path: Path) -> None:
    """Refuse an empty or truncated weights file before anything loads it, with a one-line ``ValueError`` naming it.

    A ``.safetensors`` file states its own length (an 8-byte header size, a JSON header with every tensor's byte
    range), so truncation is found by reading the header only; a ``.bin`` file must at least be a non-empty zip
    archive (torch's format).
    """
    import struct
    import zipfile

    size = path.stat().st_size
    fix = "download it again or point prior.model at a complete folder"
    if size == 0:
        raise ValueError(f"prior.model: the weights file {path} is empty; {fix}")
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
            raise ValueError(f"prior.model: the weights file {path} is not a readable safetensors file ({err}); "
                             f"{fix}") from None
        if size < 8 + header_len + end:
            raise ValueError(f"prior.model: the weights file {path} is truncated ({size:,} bytes on disk, its header "
                             f"says {8 + header_len + end:,}); {fix}")
    elif path.suffix == ".bin" and not zipfile.is_zipfile(path):
        raise ValueError(f"prior.model: the weights file {path} is truncated or not a torch checkpoint; {fix}")


def check_local_weights(config: "StableDiffusionConfig") -> None:
    """For ``prior.model`` = a local folder: every weights file of its text encoder, UNet and VAE is complete (see
    :func:`check_weights_file`). Hub ids are checked when they load (:class:`StableDiffusionPrior`)."""
    folder = Path(os.path.expanduser(config.model))
    if not folder.is_dir():
        return
    for component in WEIGHTED:
        for path in sorted((folder / component).glob("*.safetensors")) + sorted((folder / component).glob("*.bin")):
            check_weights_file(path)


@dataclass
class StableDiffusionConfig(PriorConfig):
    """Any SD 1.x/2.x model in diffusers' layout: a hub id or a local folder."""

    model: str = "stabilityai/stable-diffusion-2-1-base"
    revision: Optional[str] = None
    cache_dir: Optional[str] = None  # Hugging Face cache folder (default: HF_HOME)
    # speed options (experiments/bench/README.md measures each against the plain path)
    channels_last: bool = False  # UNet weights and inputs in channels-last memory format
    attention: str = "sdpa"  # "sdpa": PyTorch scaled_dot_product_attention; "classic": explicit softmax(QK^T)V
    compile: bool = False  # torch.compile the UNet in place (first steps are slow while it compiles)
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs, "max-autotune"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"prior.attention={self.attention!r} is not one of {list(ATTENTION)}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"prior.compile_mode={self.compile_mode!r} is not one of ['default', 'reduce-overhead', "
                             "'max-autotune', 'max-autotune-no-cudagraphs']")


#: prior.attention -> diffusers attention processor class name
ATTENTION = {"sdpa": "AttnProcessor2_0", "classic": "AttnProcessor"}


def _attention_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    """diffusers' ``Attention.forward`` without its per-call ``inspect.signature`` of the processor (0.45 of a 5.5 ms
    tiny-SD UNet call on this CPU, one per attention layer per call; experiments/bench/README.md). With no extra
    keyword arguments (sdbridge passes none) the stock forward filters an empty dict and makes exactly this call;
    with any, it runs the stock forward."""
    if cross_attention_kwargs:
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


def direct_attention(module: torch.nn.Module, on: bool = True) -> int:
    """Route every diffusers ``Attention`` layer of ``module`` (whose class keeps the stock ``forward``) straight to
    its processor (:func:`_attention_forward`, an instance attribute), or back to the stock ``forward`` (``on=False``,
    e.g. for a benchmark's official side sharing the modules). Outputs are bitwise the same
    (tests/unit/test_speed_options.py). Returns the number of layers."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in module.modules() if isinstance(m, Attention) and type(m).forward is Attention.forward]
    for layer in layers:
        if on:
            layer.forward = types.MethodType(_attention_forward, layer)
        else:
            layer.__dict__.pop("forward", None)
    return len(layers)


@builds("prior", "stable_diffusion", StableDiffusionConfig)
class StableDiffusionPrior(DiffusionPrior):
    """Stable Diffusion latent prior. ``sample_shape`` is ``(4, H/8, W/8)`` (4x64x64 for SD 2.1 base)."""

    is_latent = True
    supports_adapters = True
    interpolates_text = True  # token embeddings mix linearly (threestudio's and LucidDreamer's view interpolation)
    adapters_stay_on = False  # True for a companion (see _companion_from): adapter() then never switches them off
    _adapter_on: tuple | None = None

    def __init__(self, config: StableDiffusionConfig, path: Path | None = None,
                 components: dict[str, Any] | None = None):
        """Load the model from ``path`` (or ``config.model``), or take prebuilt ``components`` (tokenizer,
        text_encoder, unet, vae, scheduler_config), as the random-weight benchmark prior does."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.config = config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if components is None:
            path = Path(path) if path is not None else resolve_model_path(config.model, config.revision,
                                                                          config.cache_dir)
            scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
        else:
            scheduler_config = components["scheduler_config"]
        if scheduler_config.get("beta_schedule", "scaled_linear") == "scaled_linear":
            alphas_cumprod = scaled_linear_alphas_cumprod(
                scheduler_config.get("beta_start", 0.00085),
                scheduler_config.get("beta_end", 0.012),
                scheduler_config.get("num_train_timesteps", 1000),
            )
        else:
            alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(torch.float64)
        super().__init__(alphas_cumprod)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{config.model}: prediction_type {self.prediction_type!r} is not supported")

        if components is None:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            check_tokenizer(self.tokenizer, path / "tokenizer")
            try:
                self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
                self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
                self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
            except (OSError, ValueError, RuntimeError) as err:  # a damaged file in the Hugging Face cache
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise PriorUnavailableError(f"the weights of {config.model!r} in {path} cannot be loaded ({first}); "
                                            "download them again or point prior.model at a complete folder") from err
        else:
            self.tokenizer = components["tokenizer"]  # modules come in the configured dtype
            self.text_encoder, self.unet, self.vae = (components[k] for k in ("text_encoder", "unet", "vae"))
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()
        self.set_speed_options(config)
        self.dtype = dtype
        self.model_path = path
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._sample_shape = (
            int(self.unet.config.in_channels),
            int(self.unet.config.sample_size),
            int(self.unet.config.sample_size),
        )
        self.to(device)

    def set_speed_options(self, config: StableDiffusionConfig) -> None:
        """Memory format, attention kernel and compilation of the UNet (the module stays the same object, so
        adapters (VSD's LoRA) and attribute access keep working); the attention layers of the UNet and the VAE always
        call their processor directly (:func:`direct_attention`: the same outputs, less Python per call)."""
        import diffusers.models.attention_processor as processors

        if config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.unet.set_attn_processor(getattr(processors, ATTENTION[config.attention])())
        for module in (self.unet, self.vae):
            direct_attention(module)
        if config.compile:
            self.unet.compile(mode=config.compile_mode)

    # ------------------------------------------------------------------ a second denoiser on the same text encoder
    def companion_path(self, model: str) -> Path:
        """Local folder of ``model`` (a hub id or a diffusers folder) for :meth:`companion`; only its UNet and
        scheduler are fetched."""
        return resolve_model_path(model, None, self.config.cache_dir, components=("scheduler", "unet"))

    def companion(self, model: str) -> "StableDiffusionPrior":
        """Another SD UNet (and its scheduler: prediction type, schedule) served on this prior's tokenizer, text
        encoder and VAE, as a prior of its own. VSD's LoRA base in the official codes: SD 2.1 (v-prediction) next to
        SD 2.1 base, both conditioned on the same OpenCLIP text states. Loaded fresh on every call (adapters added to
        it belong to the caller). Raises :class:`PriorUnavailableError` when the weights are missing offline."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = self.companion_path(model)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
        return self._companion_from(model, unet, DDPMScheduler.load_config(path, subfolder="scheduler"), path)

    def _companion_from(self, model: str, unet, scheduler_config: dict, path: Path | None) -> "StableDiffusionPrior":
        width = int(self.text_encoder.config.hidden_size)
        if int(unet.config.cross_attention_dim) != width or int(unet.config.in_channels) != self.sample_shape[0]:
            raise ValueError(
                f"{model!r} cannot share {self.config.model!r}'s text encoder and latents: its UNet takes "
                f"{unet.config.cross_attention_dim}-d text states and {unet.config.in_channels} latent channels, "
                f"the prior gives {width}-d and {self.sample_shape[0]}"
            )
        components = {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder, "unet": unet, "vae": self.vae,
                      "scheduler_config": dict(scheduler_config)}
        other = StableDiffusionPrior(self.config, components=components)
        other.model_path = path
        # Nothing but its adapters' owner evaluates a companion (a fresh UNet per call), so adapter() leaves them on:
        # switching them costs three passes over the UNet's modules (3.3 ms a switch on the tiny UNet, twice a VSD
        # step; measured with experiments/bench/official.py --profile).
        other.adapters_stay_on = True
        self.share_nfe_counter(other)  # its evaluations are the run's NFEs
        return other

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    @property
    def image_size(self) -> int:
        return self._sample_shape[-1] * self.vae_factor

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden = self.text_encoder(tokens)[0]
        return list(hidden.unbind(0))

    # ------------------------------------------------------------------ denoiser
    def _predict_eps_batched(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[TextEmbedding]) -> torch.Tensor:
        k, B = len(conds), x_t.shape[0]
        if k == 1:  # one conditioning (inversion steps, VSD's LoRA): no copies
            x_in, emb, t_in = x_t, conds[0].value, t
        else:
            x_in = x_t.repeat(k, *([1] * (x_t.dim() - 1)))
            emb = torch.cat([c.value for c in conds])
            t_in = t.repeat(k)
        if torch.is_grad_enabled():
            out = self._unet_raw(x_in, t_in, emb)
        else:
            # Inference mode skips autograd's version counters and view tracking in every UNet op: 5.9 -> 5.6 ms for
            # the tiny UNet's CFG pair on this CPU (experiments/bench/README.md). The clone makes the output a normal
            # tensor again, which callers may modify in place.
            with torch.inference_mode():
                out = self._unet_raw(x_in, t_in, emb)
            out = out.clone()
        return self.raw_to_eps(out, x_in, t_in).view(k, B, *x_t.shape[1:])

    def predict_raw(
        self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One evaluation of the UNet as it stands (adapters and class embedding included): its native output (eps or
        v) in float32. Counts one NFE, like :meth:`predict_eps` with one conditioning."""
        out = self._unet_raw(x_t, t, emb, class_labels)
        self.nfe += 1
        return out

    def _unet_raw(
        self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x_in = x_t.to(self.dtype)
        if self.config.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        labels = None
        if class_labels is not None:  # the class embedding may be fp32 (VSD's camera embedding) on an fp16 UNet
            emb_module = self.unet.class_embedding
            dtype = next(emb_module.parameters()).dtype if emb_module is not None else self.dtype
            labels = class_labels.to(dtype)
        return self.unet(x_in, t, encoder_hidden_states=emb.to(self.dtype), class_labels=labels).sample.float()

    # ------------------------------------------------------------------ LoRA adapters (VSD's source)
    def add_lora(self, name: str, rank: int, gaussian_init: bool) -> list[torch.nn.Parameter]:
        """LoRA adapters ``name`` of rank ``rank`` on the UNet's attention projections (peft), switched off until
        :meth:`adapter`; ``gaussian_init``: diffusers' LoRAAttnProcessor init, else peft's kaiming default. A prior
        reused across runs starts fresh. Returns the adapter's parameters, in fp32 (AdamW's eps underflows in fp16)."""
        from peft import LoraConfig

        if name in getattr(self.unet, "peft_config", {}):
            self.unet.delete_adapters(name)
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian" if gaussian_init else True,
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            adapter_name=name,
        )
        self.unet.disable_adapters()
        params = self.lora_parameters(name)
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def lora_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if name in n]

    @contextlib.contextmanager
    def adapter(self, name: str, class_embedding: torch.nn.Module | None = None):
        """The UNet with adapters ``name`` on and ``class_embedding`` in place (re-entrant); off again after. Backward
        passes through the LoRA must run inside it too: peft turns ``requires_grad`` off with the adapters."""
        if self.adapters_stay_on:  # a companion serves only its adapters: switch once, never back
            if self._adapter_on != (name, class_embedding):
                self.unet.enable_adapters()
                self.unet.set_adapter(name)
                self.unet.class_embedding = class_embedding
                self._adapter_on = (name, class_embedding)
            yield
            return
        self._adapter_depth = getattr(self, "_adapter_depth", 0) + 1
        if self._adapter_depth == 1:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)
            self.unet.class_embedding = class_embedding
        try:
            yield
        finally:
            self._adapter_depth -= 1
            if self._adapter_depth == 0:
                self.unet.class_embedding = None
                self.unet.disable_adapters()

    def lora_state(self, name: str) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet, adapter_name=name)

    def load_lora_state(self, name: str, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state, adapter_name=name)

    def raw_to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            abar = per_sample(self.abar(t).float(), x_t)
            return abar.sqrt() * out + (1 - abar).sqrt() * x_t.float()
        return out

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction_type == "v_prediction":
            return self.v_target(x0.float(), noise.float(), t)
        return noise

    # ------------------------------------------------------------------ sample space
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to scaled latents (the posterior mean, so encoding is deterministic)."""
        return self._posterior(images).mean.float() * self.vae_scale

    def encode_sample(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``mean + std * N(0, I)`` of the VAE posterior (diffusers' ``latent_dist.sample()``), the noise drawn from
        ``generator``."""
        posterior = self._posterior(images)
        noise = rng.randn(tuple(posterior.mean.shape), generator).to(posterior.mean)
        return (posterior.mean + posterior.std * noise).float() * self.vae_scale

    def _posterior(self, images: torch.Tensor):
        size = self.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(images, (size, size), mode="bilinear", align_corners=False)
        return self.vae.encode((2 * images - 1).to(self.dtype)).latent_dist

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((x0 / self.vae_scale).to(self.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)
