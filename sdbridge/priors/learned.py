"""``prior=learned``: the exact world with a denoiser *trained* on it in place of the closed-form eps.

The exact prior's eps is the Bayes-optimal denoiser of its mixture. A text-to-image model's is a network that only
approximates its data's, and score distillation from ``randn`` leans on how that network behaves far from the data:
measured on this world, the closed form's expected SDS step *adds* fine texture to SDS's own images where a network
trained on the same samples removes it, and with the network SDS over-saturates and Bridge, SDI and VSD beat SDS
from ``randn``, as both papers report; with the closed form they do not (experiments/exact/README.md, "A network
trained on the world"). This prior keeps everything exact that can be, and makes the denoiser a network:

* **the world** (samples, log-densities, the model space ``z = (x - shift) / scale``, the exact metrics) is the
  analytic prior's (:class:`~sdbridge.priors.analytic.AnalyticPrior`, same fields, same cache);
* **the denoiser** is a small UNet (diffusers' ``UNet2DModel``) conditioned on the prompt's words, trained once per
  world and training config on fresh exact samples and cached (``learned_dir``, with a checksum) like the world. The
  default config's network ships with sdbridge (``SHIPPED_DIR``, trained here by ``python
  experiments/exact/learned_prior.py prior.shipped=false``, 44 min on 2 CPU cores); a run with another config that
  finds no cached network trains it first (~4-6 min per 1000 steps on 2 CPU cores at 16 px, seconds on a GPU).

**Training.** The diffusion loss on fresh exact samples (as SD is trained), plus a loss on what score distillation
multiplies by its guidance scale: the *differences* between conditionings at the same noisy image (eps(y) -
eps(y + modifier words), eps(y) - eps("")) regress the closed form's (``difference_weight``, :func:`difference_loss`).
Without it the small network's Bridge difference on clean images was 0.05 per pixel at t <= 300, where the exact one
is 0, and took color out of them, and Bridge's stage 2 (x 40) dimmed every image (experiments/exact/README.md:
``python experiments/exact/conditional_difference.py``).

**Text encoder.** A prompt is parsed by the exact prior's vocabulary (:func:`~sdbridge.priors.vocabulary.parse_prompt`:
unknown words fail with the vocabulary) into the bag of its shape, color and modifier words, a multi-hot vector
(:data:`PROMPT_FEATURES`); a 2-layer MLP maps it to the UNet's class embedding. The empty prompt is the zero vector.
Every prompt of the vocabulary thus has a prediction, as with a real text encoder, and it is good where training put
samples: :func:`training_prompts` — the empty prompt, each shape, each color and each of the 36 concepts, alone, with
Bridge's source words, with NFSD's negative words, and with each single modifier word.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdbridge.files import atomic_open
from sdbridge.priors import cache
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior
from sdbridge.priors.base import TextEmbedding
from sdbridge.priors.vocabulary import BRIDGE_SOURCE_WORDS, MODIFIERS, NFSD_NEGATIVE_WORDS, parse_prompt
from sdbridge.priors.world import COLORS, SHAPES
from sdbridge.registry import builds

log = logging.getLogger("sdbridge")

#: bump when the network, its features or its training change meaning (cached networks are then retrained)
LEARNED_VERSION = 1

#: the words a prompt's feature vector marks (multi-hot), in this order
PROMPT_FEATURES: tuple[str, ...] = (*SHAPES, *COLORS, *MODIFIERS)

#: fields of the config that do not change the network (where it runs or is stored)
_NOT_IN_SPEC = {"device", "dtype", "cache_dir", "checkpoint", "learned_dir", "shipped"}

#: networks trained by :func:`train_network` and shipped with the package (``learned-<size>px-<spec digest>.pt`` and
#: its checksum sidecar): the default config's, so a first ``prior=learned`` run needs no training
SHIPPED_DIR = Path(__file__).resolve().parent / "networks"

#: ``prior.train_target`` values (:class:`LearnedConfig`)
TRAIN_TARGETS = ("noise", "exact")


@dataclass
class LearnedConfig(AnalyticConfig):
    """``prior=learned``: the exact world (every :class:`AnalyticConfig` field) with a trained UNet as its eps."""

    size: int = 16  # 16 px (the default config's network ships with sdbridge; 32 px trains ~70 min on 2 CPU cores)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # UNet block widths (attention at the second)
    layers: int = 1  # ResNet layers per UNet block
    #: 7000: with 3500 (the default until 2026-12-06, 14 min on 2 CPU cores) Bridge turns "a blue square" into rings
    #: on ``make run``'s protocol; with 7000 it keeps the squares (experiments/exact/README.md)
    train_steps: int = 7000
    batch: int = 64
    lr: float = 1e-3  # AdamW, 200 warm-up steps, then cosine to 0
    ema: float = 0.995  # the saved weights are this EMA of the trained ones
    pool: int = 8192  # fresh exact samples drawn every ``refresh`` steps (over the training prompts)
    refresh: int = 500
    train_seed: int = 0  # the training's generator (samples, t, noise, init): a network is reproducible
    #: what the network regresses: "noise", the drawn noise (denoising score matching, as SD is trained), or "exact",
    #: the closed form's eps at the same x_t and prompt (E[noise | x_t, prompt]: the same minimizer without the
    #: target's variance; +0.1 s per step at 16 px). Measured at the defaults: about the same network (diffusion
    #: loss +4% ... +56% over the closed form against +5% ... +62%; experiments/exact/README.md)
    train_target: str = "noise"
    #: weight of a second loss on the *differences* between conditionings, which score distillation multiplies by its
    #: guidance scale: at the same x_t (an exact sample of a base prompt, noised), the network's eps(prompt) -
    #: eps(partner) regresses the closed form's, for a quarter of each batch; partner = the same base prompt with
    #: another suffix of :func:`training_prompts` (Bridge's source words, NFSD's negatives, one modifier, none) or the
    #: empty prompt. 0: off (the diffusion loss alone, as SD is trained; the default until 2026-12-06). 16: measured on
    #: ``make run``'s protocol, Bridge's saturation 0.82 against the truth's 0.90 (0.45 without), and the network's
    #: Bridge difference at t = 100 on exact samples 0.006 RMS where the exact one is 0 (0.053 without); training takes
    #: 44 min on 2 CPU cores instead of 28 (experiments/exact/README.md)
    difference_weight: float = 16.0
    checkpoint: str = ""  # a trained network's file; "" = the shipped or cached one for this config (trained on first use)
    learned_dir: str = "~/.cache/sdbridge/learned"
    #: use the network shipped with sdbridge for this config when there is one (``SHIPPED_DIR``); false: the one in
    #: ``learned_dir``, trained there on first use (to retrain the shipped one, or check that training reproduces it)
    shipped: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.channels) != 2 or min(self.channels) < 16 or any(c % 16 for c in self.channels):
            raise ValueError(f"prior.channels={list(self.channels)} must be two block widths, multiples of 16 "
                             "(group norm of 16 groups)")
        positive = {"layers": self.layers, "train_steps": self.train_steps, "batch": self.batch,
                    "pool": self.pool, "refresh": self.refresh}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"prior.{key}={value} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"prior.lr={self.lr} must be > 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"prior.ema={self.ema} must be in [0, 1)")
        if not self.difference_weight >= 0:
            raise ValueError(f"prior.difference_weight={self.difference_weight} must be >= 0")
        self.difference_weight = float(self.difference_weight)  # 16 and 16.0 are one network (one cache key)
        if self.train_target not in TRAIN_TARGETS:
            raise ValueError(f"prior.train_target={self.train_target!r}; allowed: {', '.join(TRAIN_TARGETS)}")
        if self.size % 4:
            raise ValueError(f"prior.size={self.size}: the learned prior's UNet halves the image once per block; use a "
                             "multiple of 4")

    def spec(self) -> dict:
        """What the network depends on: the world, the text model and the training (not where it runs)."""
        fields_ = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_SPEC}
        if fields_["train_target"] == "noise":  # the original training: networks cached before the field keep their key
            del fields_["train_target"]
        if fields_["difference_weight"] == 0:  # likewise
            del fields_["difference_weight"]
        return {"version": LEARNED_VERSION, **fields_}


def prompt_features(prompts: list[str]) -> torch.Tensor:
    """``(n, len(PROMPT_FEATURES))`` multi-hot vectors of the prompts' shape, color and modifier words."""
    index = {w: i for i, w in enumerate(PROMPT_FEATURES)}
    out = torch.zeros(len(prompts), len(PROMPT_FEATURES))
    for row, prompt in enumerate(prompts):
        parsed = parse_prompt(prompt)
        for word in (*parsed.shapes, *parsed.colors, *parsed.modifiers):
            out[row, index[word]] = 1.0
    return out


#: the base prompts of :func:`training_prompts`: the empty prompt, each shape, each color, each concept
BASE_PROMPTS: tuple[str, ...] = ("", *(f"a {s}" for s in SHAPES), *COLORS,
                                 *(f"a {c} {s}" for s in SHAPES for c in COLORS))


def training_prompts() -> tuple[list[str], torch.Tensor]:
    """The prompts the network is trained on, and each one's share of the training samples.

    49 base prompts ("", each shape, each color, each concept "a {color} {shape}"), each alone (half of the samples),
    with Bridge's source words (15%), with NFSD's negative words (10%) and with each single modifier word (25%
    together). Bridge's target words are quality words, the identity, so its target prompt is the base prompt."""
    base = BASE_PROMPTS
    suffixes = [("", 0.5), (", " + ", ".join(BRIDGE_SOURCE_WORDS), 0.15), (", " + ", ".join(NFSD_NEGATIVE_WORDS), 0.10)]
    suffixes += [(f", {m}", 0.25 / len(MODIFIERS)) for m in MODIFIERS]
    prompts = [f"{b}{s}".lstrip(", ") for s, _ in suffixes for b in base]
    weights = torch.tensor([w / len(base) for _, w in suffixes for _ in base], dtype=torch.float64)
    return prompts, weights


class WordConditionedUNet(nn.Module):
    """A ``UNet2DModel`` whose class embedding is an MLP of the prompt's word features (:func:`prompt_features`)."""

    def __init__(self, size: int, channels: list[int], layers: int):
        super().__init__()
        from diffusers import UNet2DModel

        dim = 4 * channels[0]  # UNet2DModel's time-embedding width
        self.unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                                layers_per_block=layers, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), class_embed_type="identity",
                                norm_num_groups=16)
        self.text = nn.Sequential(nn.Linear(len(PROMPT_FEATURES), dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=self.text(features)).sample


def network_path(config: LearnedConfig) -> Path:
    """Where the network of ``config`` is cached (one file per spec)."""
    digest = hashlib.sha1(json.dumps(config.spec(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(os.path.expanduser(config.learned_dir)) / f"learned-{config.size}px-{digest}.pt"


def regression_target(world: AnalyticPrior, config: LearnedConfig, x_t: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """What the network is trained to output at ``x_t`` (``prior.train_target``): the drawn ``noise``, or the closed
    form's eps of each image under its own prompt, E[noise | x_t, prompt]."""
    if config.train_target == "noise":
        return noise
    cond = world.encode_text(prompts)
    return AnalyticPrior._predict_eps_batched(world, x_t.to(world.device), t.to(world.device), [cond])[0].float().cpu()


def train_network(world: AnalyticPrior, config: LearnedConfig, out: Path) -> dict:
    """Train the network of ``config`` on fresh exact samples of ``world`` and write it to ``out`` (atomically, with
    its checksum); returns the checkpoint. Seeded by ``train_seed``: the same config gives the same weights."""
    torch.manual_seed(config.train_seed)
    gen = torch.Generator().manual_seed(config.train_seed)
    device = world.device
    net = WordConditionedUNet(config.size, list(config.channels), config.layers).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    prompts, weights = training_prompts()
    features = prompt_features(prompts)
    log.info("sdbridge: training the learned prior once (%d steps, %d-px world; ~%d min per 1000 steps on 2 CPU cores "
             "at 16 px), cached at %s", config.train_steps, config.size, 6 if config.difference_weight else 4, out)
    start, losses, history = time.time(), [], []
    for step in range(config.train_steps):
        if step % config.refresh == 0:  # fresh exact samples: the network sees the distribution, not a fixed set
            pick = torch.multinomial(weights, config.pool, replacement=True, generator=gen)
            counts = torch.bincount(pick, minlength=len(prompts))
            used = torch.nonzero(counts).flatten().tolist()
            x_all = torch.cat([world.sample(prompts[i], int(counts[i]), gen).float() for i in used]).cpu()
            f_all = torch.cat([features[i].expand(int(counts[i]), -1) for i in used])
            i_all = torch.cat([torch.full((int(counts[i]),), i) for i in used])
        idx = torch.randint(0, config.pool, (config.batch,), generator=gen)
        t = torch.randint(0, world.num_train_timesteps, (config.batch,), generator=gen)
        eps = torch.randn((config.batch, *world.sample_shape), generator=gen)
        x_t = world.add_noise(x_all[idx], eps, t)
        eps = regression_target(world, config, x_t, t, eps, [prompts[i] for i in i_all[idx].tolist()])
        lr = config.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / config.train_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = net(x_t.to(device), t.to(device), f_all[idx].to(device))
        loss = (pred - eps.to(device)).pow(2).mean()
        if config.difference_weight > 0:
            loss = loss + config.difference_weight * difference_loss(world, net, pred, x_t, t, i_all[idx], prompts,
                                                                     features, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - config.ema)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == config.train_steps:
            mean = sum(losses) / len(losses)
            history.append({"step": step + 1, "loss": mean})
            log.info("sdbridge: learned prior step %d/%d  loss %.4f  lr %.2e  %.0f s", step + 1, config.train_steps,
                     mean, lr, time.time() - start)
            losses = []
    ckpt = {"state_dict": {k: v.cpu() for k, v in ema.state_dict().items()}, "spec": config.spec(),
            "features": list(PROMPT_FEATURES), "history": history, "seconds": time.time() - start}
    ckpt["report"] = diffusion_loss_report(world, ema, gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        torch.save(ckpt, f)
    cache.write_sidecar(out)
    return {**ckpt, "file": str(out)}


def difference_loss(world: AnalyticPrior, net: WordConditionedUNet, pred: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, which: torch.Tensor, prompts: list[str], features: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
    """``prior.difference_weight``'s loss: on up to a quarter of the batch, the items drawn from a base prompt alone,
    the squared error of the network's eps(prompt) - eps(partner) against the closed form's at the same ``x_t``
    (``pred``: the network's eps(prompt) of the batch; ``which``: each item's index in ``prompts``, ordered as
    :func:`training_prompts` builds them, suffix-major)."""
    suffixes = len(prompts) // len(BASE_PROMPTS)
    rows = torch.nonzero(which < len(BASE_PROMPTS)).flatten()[: max(1, len(which) // 4)]  # base prompts, no suffix
    if len(rows) == 0:
        return pred.new_zeros(())
    base = which[rows]
    pick = torch.randint(0, suffixes, (len(rows),), generator=gen)  # 1..: another suffix; 0: the empty prompt
    pick = torch.where((pick == 0) & (base == 0), torch.ones_like(pick), pick)  # "" has no other empty partner
    partner = torch.where(pick == 0, torch.zeros_like(base), pick * len(BASE_PROMPTS) + base)
    device = pred.device
    x_sel, t_sel = x_t[rows].to(device), t[rows].to(device)
    pred_partner = net(x_sel, t_sel, features[partner].to(device))
    conds = [world.encode_text([prompts[i] for i in index.tolist()]) for index in (base, partner)]
    exact = AnalyticPrior._predict_eps_batched(world, x_sel.to(world.device), t_sel.to(world.device), conds)
    target = (exact[0] - exact[1]).float().to(device)
    return ((pred[rows] - pred_partner) - target).pow(2).mean()


@torch.no_grad()
def diffusion_loss_report(world: AnalyticPrior, net: WordConditionedUNet, gen: torch.Generator,
                          prompts: tuple[str, ...] = ("", "a red circle", "a blue square", "a circle"), n: int = 64,
                          ts: tuple[int, ...] = (50, 100, 300, 500, 700, 900)) -> list[dict]:
    """The network's diffusion loss against the closed form's (the Bayes optimum) on fresh exact samples, by t."""
    rows = []
    device = world.device
    for t in ts:
        net_loss = exact_loss = 0.0
        for prompt in prompts:
            x0 = world.sample(prompt, n, gen)
            tt = torch.full((n,), t)
            eps = torch.randn(x0.shape, generator=gen)
            x_t = world.add_noise(x0, eps, tt)
            pred = net(x_t.to(device), tt.to(device), prompt_features([prompt] * n).to(device)).cpu()
            exact = AnalyticPrior._predict_eps_batched(world, x_t.to(device), tt.to(device),
                                                       [world.encode_text([prompt] * n)])[0].cpu()
            net_loss += (pred - eps).pow(2).mean().item() / len(prompts)
            exact_loss += (exact - eps).pow(2).mean().item() / len(prompts)
        rows.append({"t": t, "network": net_loss, "closed_form": exact_loss})
    return rows


def load_network(path: Path, config: LearnedConfig) -> dict:
    """A checkpoint file, refused (one-line ``ValueError``) when it was trained on another world or text model."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 (any unreadable file gets the same one-line answer)
        raise ValueError(f"prior.checkpoint={str(path)!r} is not a learned-prior checkpoint ({type(err).__name__})")
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"prior.checkpoint={str(path)!r} is not a learned-prior checkpoint (no spec / state_dict)")
    if list(ckpt.get("features", [])) != list(PROMPT_FEATURES):
        raise ValueError(f"prior.checkpoint={str(path)!r} was trained with other prompt features; retrain it")
    want = config.spec()
    training = {"channels", "layers", "train_steps", "batch", "lr", "ema", "pool", "refresh", "train_seed",
                "train_target", "difference_weight"}
    differ = sorted(k for k in set(want) | set(ckpt["spec"])
                    if k not in training and want.get(k) != ckpt["spec"].get(k))
    if differ:
        shown = ", ".join(f"{k}={ckpt['spec'].get(k)!r} (run: {want.get(k)!r})" for k in differ)
        raise ValueError(f"prior.checkpoint={str(path)!r} was trained on another world: {shown}. Set those prior "
                         "fields to the checkpoint's")
    return {**ckpt, "file": str(path)}  # where it was loaded from (not stored in the file)


def check_checkpoint(config: LearnedConfig) -> dict:
    """``prior.checkpoint``, loaded and checked against the run's world (one-line ``ValueError``: before a run writes
    anything)."""
    path = Path(os.path.expanduser(config.checkpoint))
    if not path.is_file():
        raise ValueError(f"prior.checkpoint={config.checkpoint!r}: no such file (leave it empty to use the network "
                         f"shipped with sdbridge or cached in prior.learned_dir, trained on first use)")
    return load_network(path, config)


def shipped_network(config: LearnedConfig) -> Path | None:
    """The network of ``config`` shipped with sdbridge (``SHIPPED_DIR``), or None: none for this config, or
    ``prior.shipped=false``, or a damaged file (one-line warning)."""
    if not config.shipped:
        return None
    path = SHIPPED_DIR / network_path(config).name
    if not path.is_file():
        return None
    problem = cache.verify_file(path)
    if problem is not None:
        log.warning("sdbridge: the shipped learned-prior network %s does not match its checksum (%s); using the cache "
                    "(prior.learned_dir) instead", path, problem)
        return None
    return path


def ensure_network(world: AnalyticPrior, config: LearnedConfig) -> dict:
    """The checkpoint of ``config``: ``prior.checkpoint`` if set, else the shipped one (:func:`shipped_network`), else
    the cached one, trained first if missing (a cache file that does not match its checksum is retrained with a
    one-line warning). Processes that find it missing at the same time train it once: the first holds a lock
    (:func:`sdbridge.priors.cache.exclusive`), the others wait for it and load its file. The checkpoint's ``file``
    says which file it came from (set by :func:`load_network` and :func:`train_network`)."""
    if config.checkpoint:
        return check_checkpoint(config)
    shipped = shipped_network(config)
    if shipped is not None:
        return load_network(shipped, config)
    path = network_path(config)
    if path.is_file() and cache.verify_file(path) is None:
        return load_network(path, config)
    with cache.exclusive(path, "learned-prior"):  # concurrent first uses (a sweep's jobs) train it once
        if path.is_file():  # trained meanwhile by the process this one waited for, or damaged
            problem = cache.verify_file(path)
            if problem is None:
                return load_network(path, config)
            cache.warn_rebuild("learned-prior", path, problem)
        return train_network(world, config, path)


@builds("prior", "learned", LearnedConfig)
class LearnedPrior(AnalyticPrior):
    """``prior=learned``: :class:`AnalyticPrior`'s world and exact metrics, a trained network's eps (module doc)."""

    combines_linearly = False  # a network evaluates each conditioning; its sums are of the predictions

    def __init__(self, config: LearnedConfig | None = None):
        super().__init__(config or LearnedConfig())
        self.checkpoint = ensure_network(self, self.config)
        self.net = WordConditionedUNet(self.config.size, list(self.config.channels), self.config.layers)
        self.net.load_state_dict(self.checkpoint["state_dict"])
        self.net.to(self._device).eval().requires_grad_(False)
        self._features: dict[str, torch.Tensor] = {}

    def _prompt_features(self, conds: list[TextEmbedding]) -> torch.Tensor:
        texts = [m.prompt for c in conds for m in c.value]  # each conditioning's parsed distributions
        for text in set(texts) - set(self._features):
            self._features[text] = prompt_features([text])[0]
        return torch.stack([self._features[p] for p in texts]).to(self._device)

    def _predict_eps_batched(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[TextEmbedding]) -> torch.Tensor:
        """Every conditioning in one batched network call, as the SD prior does (``t`` as given, like SD's UNet)."""
        k = len(conds)
        with torch.no_grad():
            eps = self.net(x_t.float().repeat(k, 1, 1, 1), t.repeat(k), self._prompt_features(conds))
        return eps.view(k, *x_t.shape)


def config_from_dotlist(items: list[str]) -> LearnedConfig:
    """A :class:`LearnedConfig` from ``field=value`` arguments, with or without ``prior.`` (the scripts' CLI)."""
    from omegaconf import OmegaConf

    fields_ = OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))
    fields_.update(fields_.pop("prior", {}) or {})
    unknown = sorted(set(fields_) - set(LearnedConfig.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"unknown prior=learned field(s): {', '.join(unknown)}; allowed: "
                         f"{', '.join(LearnedConfig.__dataclass_fields__)}")
    return LearnedConfig(**fields_)


def main(argv: list[str] | None = None) -> None:
    """``python experiments/exact/learned_prior.py [field=value ...]``: train (or find) the network of that config and
    print where it is, its training curve and its diffusion loss against the closed form's, by t."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_dotlist(sys.argv[1:] if argv is None else argv)
    prior = LearnedPrior(config)
    print(f"network: {prior.checkpoint['file']} ({prior.checkpoint['seconds']:.0f} s of training)")
    print("step   " + "  ".join(f"{h['step']:>6}" for h in prior.checkpoint["history"][::4]))
    print("loss   " + "  ".join(f"{h['loss']:6.4f}" for h in prior.checkpoint["history"][::4]))
    for row in prior.checkpoint["report"]:
        print(f"t {row['t']:>3}: diffusion loss network {row['network']:.4f}, closed form {row['closed_form']:.4f} "
              f"({row['network'] / row['closed_form'] - 1:+.0%})")


__all__ = ["LearnedConfig", "LearnedPrior", "PROMPT_FEATURES", "TRAIN_TARGETS", "check_checkpoint", "config_from_dotlist",
           "ensure_network", "network_path", "prompt_features", "shipped_network", "train_network", "training_prompts"]
