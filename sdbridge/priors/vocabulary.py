"""Prompt semantics of the exact prior: every word has a defined, exact meaning.

A prompt is split on commas and white space (phrases such as "low quality" are matched first). Each word is one of

* a **shape** (circle, square, triangle, ring, cross, star) or a **color** (red, green, blue, yellow, purple,
  white): they **tilt** one shared mixture over all 36 concepts, they do not select. The prompt names the concepts
  "named shapes (all if none) x named colors (all if none)"; concept (s, c) gets weight proportional to
  ``exp(lambda * matches(s, c))``, where ``matches`` counts the prompt's attributes the concept has (0, 1 or 2), and
  ``lambda`` is set so that the named concepts hold ``prior.text_adherence`` of the mass (0.9 by default); a concept
  with the right shape but the wrong color sits in between. "" (no shape, no color) weights all 36 equally: the
  unconditional distribution. Named attributes also set the components' means slightly
  (``sdbridge.priors.analytic``): the named concepts keep their full color contrast, the others ``1 -
  prior.text_contrast`` of it, and every component of another shape moves ``prior.text_pull`` of the way toward the
  nearest component of a named shape, so classifier-free guidance has something to
  amplify at every noise level, as with a real text-to-image model;
* a **modifier**: a corruption ``x -> A x + b`` of the clean image — a spatial linear map applied to each channel
  (blur, pixelation, a fixed warp; each keeps constant images constant), an affine map of each pixel's RGB
  (saturation, blends toward a gray level) and optionally extra isotropic noise. A modifier does not replace the
  distribution, it **mixes in a corrupted copy**: with modifier words m_1..m_k (each counted once, order irrelevant)

      p(x | y, m_1..m_k) = [ p(x | y) + w * sum_i C_i p(x | y) ] / (1 + k w)

  where ``C_i p`` is the distribution of ``A_i x + b_i`` (+ noise) for x from the coarse geometry model of ``p``'s
  concepts, with the same text tilt, and w = ``prior.modifier_weight`` (1.0 by default: each word adds as much mass as
  the clean distribution has). So every ``log p(x | y) - log p(x | y, mods)`` is bounded above by ``log(1 + k w)``,
  as for a real model, whose source prompts never exclude the clean images. Spatial and color maps commute with the
  world's color x geometry factorization, so a corrupted copy is again a mixture of low-rank Gaussians, exactly;
* a **quality word** (detailed, high resolution, high quality, sharp, realistic, ...): the identity map — the world's
  images already are sharp, so the Bridge target modifiers describe the clean distribution;
* a **view word** (front, side, back, overhead; the suffixes of view-dependent prompting): the identity map — the
  exact world is view-invariant, as if every concept were a flat-shaded 3D object that looks the same from every
  direction (a colored circle is a ball), so a NeRF has a well-defined exact target from every camera;
* a **filler word** (a, an, the, photo, of, DSLR, ...): ignored (``STOP_WORDS``).

Any other word is an error that lists this vocabulary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sdbridge.priors.world import COLORS, SHAPES

STOP_WORDS = frozenset(
    "a an the of in on with and or photo photograph picture image render rendering dslr shot close up closeup "
    "view single one some very highly".split()
)

IDENTITY_WORDS = frozenset(
    "detailed high resolution quality sharp realistic photorealistic natural real clean crisp beautiful "
    "high-resolution".split()
)

VIEW_WORDS = frozenset("front side back overhead".split())

Images = torch.Tensor  # (n, C, S, S)


# --------------------------------------------------------------------------------------------- spatial maps
# Linear in the image, applied to each channel alike, and each keeps a constant image constant (so they act on the
# world's coverage masks alone).
def _gaussian_kernel(sigma: float, device=None) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    return k / k.sum()


def _blur_matrix(n: int, sigma: float, dtype, device) -> torch.Tensor:
    """(n, n): row i is the 1-D blur (reflect padding) of the unit vector e_i, so ``v @ M`` blurs rows ``v``."""
    k = _gaussian_kernel(sigma, device).to(dtype)
    r = k.numel() // 2
    eye = torch.eye(n, dtype=dtype, device=device).unsqueeze(1)
    return F.conv1d(F.pad(eye, (r, r), mode="reflect"), k.view(1, 1, -1)).squeeze(1)


def blur(x: Images, sigma: float) -> Images:
    """Separable Gaussian blur with reflect padding, as two matrix products (a depthwise conv2d in float64 on a CPU is
    ~40x slower on the classifier's 18,000 templates)."""
    h, w = x.shape[-2:]
    rows = _blur_matrix(w, sigma, x.dtype, x.device)
    cols = rows if h == w else _blur_matrix(h, sigma, x.dtype, x.device)
    return cols.T @ (x @ rows)


def pixelate(x: Images, factor: int) -> Images:
    """Average over factor x factor blocks, then nearest upsampling."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


def downsample(x: Images, factor: int) -> Images:
    """Average over factor x factor blocks, then bilinear upsampling: a smooth low-resolution image."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)


def warp(x: Images, seed: int, strength: float) -> Images:
    """A fixed smooth random displacement field (bilinear resampling, border padding)."""
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 2, 4, 4, generator=g) * strength
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).to(x)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    grid = torch.stack([xs, ys], -1).to(x).unsqueeze(0) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)


SPATIAL_OPS: dict[str, Callable[..., Images]] = {"blur": blur, "pixelate": pixelate, "downsample": downsample,
                                                 "warp": warp}


# --------------------------------------------------------------------------------------------- color maps
# Affine in each pixel's RGB (in [-1, 1] units): x_p -> M x_p + o.
def saturation(gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the chroma (deviation from the pixel's gray level) by ``gain``."""
    gray = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    return gray + gain * (torch.eye(3, dtype=torch.float64) - gray), torch.zeros(3, dtype=torch.float64)


def toward(level: float, amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend toward a constant gray ``level`` ([-1, 1] units): contrast loss, fog, darkening."""
    return (1 - amount) * torch.eye(3, dtype=torch.float64), torch.full((3,), amount * level, dtype=torch.float64)


COLOR_OPS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"saturation": saturation, "toward": toward}


@dataclass(frozen=True)
class Modifier:
    """A corruption: ``spatial`` ops (name, *args) in order, then ``color`` ops in order, plus isotropic noise of
    std ``noise_std`` ([-1, 1] units). Its corrupted copy is mixed into the prompt's distribution (module docstring)."""

    description: str
    spatial: tuple[tuple, ...] = ()
    color: tuple[tuple, ...] = ()
    noise_std: float = 0.0

    def apply_spatial(self, x: Images) -> Images:
        for name, *args in self.spatial:
            x = SPATIAL_OPS[name](x, *args)
        return x

    def color_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, o)``: the composed per-pixel color map x_p -> M x_p + o."""
        M, o = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for name, *args in self.color:
            A, b = COLOR_OPS[name](*args)
            M, o = A @ M, A @ o + b
        return M, o

    def apply(self, x: Images) -> Images:
        """The corruption of clean images ``(n, 3, S, S)`` in [-1, 1] units, without the noise."""
        M, o = self.color_affine()
        y = self.apply_spatial(x.double())
        return (torch.einsum("ij,njhw->nihw", M, y) + o.view(1, 3, 1, 1)).to(x.dtype)


# Levels are in [-1, 1] units: -1 is black, 1 is white, 0 mid-gray.
MODIFIERS: dict[str, Modifier] = {
    # Bridge source modifiers (artifacts of SDS-like results)
    "oversaturated": Modifier("chroma x 1.8 around each pixel's gray level", color=(("saturation", 1.8),)),
    "smooth": Modifier("Gaussian blur, sigma 1.0 px", spatial=(("blur", 1.0),)),
    "pixelated": Modifier("4x4 block average, nearest upsampling", spatial=(("pixelate", 4),)),
    "cartoon": Modifier("blur sigma 0.7 px, then chroma x 1.4", spatial=(("blur", 0.7),), color=(("saturation", 1.4),)),
    "foggy": Modifier("blur sigma 1.0 px, then 45% blend toward light gray (+0.5)", spatial=(("blur", 1.0),),
                      color=(("toward", 0.5, 0.45),)),
    "hazy": Modifier("35% blend toward light gray (+0.3)", color=(("toward", 0.3, 0.35),)),
    "blurry": Modifier("Gaussian blur, sigma 1.5 px", spatial=(("blur", 1.5),)),
    "bad structure": Modifier("fixed smooth random warp (seed 1, strength 0.15)", spatial=(("warp", 1, 0.15),)),
    "noisy": Modifier("extra isotropic noise, std 0.25", noise_std=0.25),
    "malformed": Modifier("fixed smooth random warp (seed 2, strength 0.25)", spatial=(("warp", 2, 0.25),)),
    # NFSD negative-prompt words
    "unrealistic": Modifier("chroma x 1.5 and 20% blend toward mid-gray",
                            color=(("saturation", 1.5), ("toward", 0.0, 0.2))),
    "low quality": Modifier("2x2 block average, then blur sigma 0.7 px", spatial=(("pixelate", 2), ("blur", 0.7))),
    "out of focus": Modifier("Gaussian blur, sigma 2.0 px", spatial=(("blur", 2.0),)),
    "ugly": Modifier("fixed smooth random warp (seed 3, strength 0.2), chroma x 0.7", spatial=(("warp", 3, 0.2),),
                     color=(("saturation", 0.7),)),
    "low contrast": Modifier("60% blend toward mid-gray (0)", color=(("toward", 0.0, 0.6),)),
    "dull": Modifier("chroma x 0.4, then 20% blend toward mid-gray", color=(("saturation", 0.4), ("toward", 0.0, 0.2))),
    "dark": Modifier("50% blend toward black (-1)", color=(("toward", -1.0, 0.5),)),
    "low resolution": Modifier("4x4 block average, bilinear upsampling", spatial=(("downsample", 4),)),
    "gloomy": Modifier("chroma x 0.6, then 40% blend toward black", color=(("saturation", 0.6), ("toward", -1.0, 0.4))),
    # painting-to-real
    "painting": Modifier("blur sigma 0.8 px, chroma x 1.3, fixed warp (seed 4, strength 0.08)",
                         spatial=(("blur", 0.8), ("warp", 4, 0.08)), color=(("saturation", 1.3),)),
}

#: the modifier words of the Bridge paper's source prompt suffix and of NFSD's negative prompt (their guidance modules
#: hold the official strings; a test checks that these parse to them): what a prior trained on the world must know
BRIDGE_SOURCE_WORDS = ("oversaturated", "smooth", "pixelated", "cartoon", "foggy", "hazy", "blurry", "bad structure",
                       "noisy", "malformed")
NFSD_NEGATIVE_WORDS = ("unrealistic", "blurry", "low quality", "out of focus", "ugly", "low contrast", "dull", "dark",
                       "low resolution", "gloomy")

ALIASES = {
    "low-resolution": "low resolution",
    "low-quality": "low quality",
    "lowres": "low resolution",
    "blurred": "blurry",
    "saturated": "oversaturated",
    "over-saturated": "oversaturated",
    "pixelized": "pixelated",
    "noise": "noisy",
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "rings": "ring",
    "crosses": "cross",
    "stars": "star",
    "disk": "circle",
    "ball": "circle",
    "sphere": "circle",
    "disc": "circle",
    "violet": "purple",
}


def vocabulary() -> dict[str, list[str]]:
    return {
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "modifiers": list(MODIFIERS),
        "quality words (identity)": sorted(IDENTITY_WORDS),
        "view words (identity)": sorted(VIEW_WORDS),
        "filler words (ignored)": sorted(STOP_WORDS),
        "aliases": [f"{k}->{v}" for k, v in sorted(ALIASES.items())],
    }


class UnknownWordError(ValueError):
    """A prompt word the exact prior does not define."""


@dataclass(frozen=True)
class ParsedPrompt:
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    modifiers: tuple[str, ...]

    def concepts(self) -> list[tuple[str, str]]:
        """The concepts the prompt names: the named shapes (all if none) x the named colors (all if none)."""
        shapes = self.shapes or SHAPES
        colors = self.colors or tuple(COLORS)
        return [(s, c) for s in shapes for c in colors]

    def matches(self, shape: str, color: str) -> int:
        """How many of the prompt's attributes (shape, color) a concept has; an attribute the prompt does not name
        matches every concept."""
        return int(not self.shapes or shape in self.shapes) + int(not self.colors or color in self.colors)


_PHRASES = sorted([p for p in [*MODIFIERS, *ALIASES] if " " in p or "-" in p], key=len, reverse=True)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a prompt into selected shapes, colors and the ordered modifier chain."""
    text = " " + re.sub(r"[,.;:!?()\[\]\"]", " ", prompt.lower()) + " "
    text = re.sub(r"\s+", " ", text)
    found: list[tuple[int, str]] = []
    for phrase in _PHRASES:  # multi-word and hyphenated terms first
        pattern = f" {phrase} "
        while pattern in text:
            pos = text.index(pattern)
            found.append((pos, ALIASES.get(phrase, phrase)))
            text = text[:pos] + " " + "\0" * len(phrase) + " " + text[pos + len(pattern):]
    shapes: list[str] = []
    colors: list[str] = []
    modifiers: list[tuple[int, str]] = []
    pos = 0
    unknown = []
    for word in text.split(" "):
        if not word:
            pos += 1
            continue
        start = pos
        pos += len(word) + 1
        if set(word) == {"\0"}:
            continue
        word = ALIASES.get(word, word)
        if word in SHAPES:
            shapes.append(word)
        elif word in COLORS:
            colors.append(word)
        elif word in MODIFIERS:
            modifiers.append((start, word))
        elif word in STOP_WORDS or word in IDENTITY_WORDS or word in VIEW_WORDS:
            continue
        else:
            unknown.append(word)
    if unknown:
        vocab = vocabulary()
        listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in vocab.items() if k != "aliases")
        raise UnknownWordError(
            f"the exact prior does not know the word(s) {unknown} in prompt {prompt!r}. Vocabulary — {listing}"
        )
    for start, phrase in found:
        if phrase in MODIFIERS:
            modifiers.append((start, phrase))
        elif phrase in SHAPES:
            shapes.append(phrase)
    ordered = tuple(dict.fromkeys(m for _, m in sorted(modifiers)))  # each word once, in order of appearance
    return ParsedPrompt(tuple(dict.fromkeys(shapes)), tuple(dict.fromkeys(colors)), ordered)


def markdown_table() -> str:
    """The vocabulary as the Markdown table in the README (kept in sync by a test)."""
    lines = ["| word(s) | kind | exact meaning |", "| --- | --- | --- |"]
    lines.append(f"| {', '.join(SHAPES)} | shape | tilts the shared mixture toward concepts of that shape |")
    lines.append(f"| {', '.join(COLORS)} | color | tilts the shared mixture toward concepts of that color |")
    for name, mod in MODIFIERS.items():
        lines.append(f"| {name} | modifier | mixes in a copy corrupted by: {mod.description} |")
    lines.append(f"| {', '.join(sorted(IDENTITY_WORDS))} | quality | identity (the world's images are already sharp) |")
    lines.append(f"| {', '.join(sorted(VIEW_WORDS))} | view | identity (the world looks the same from every view) |")
    lines.append(f"| {', '.join(sorted(STOP_WORDS))} | filler | ignored |")
    lines.append(f"| {', '.join(f'{k} → {v}' for k, v in sorted(ALIASES.items()))} | alias | same as the word after → |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
