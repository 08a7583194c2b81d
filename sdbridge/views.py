"""The cameras of a step and the prompts they resolve to: the prompt layer of a 3D target.

A 3D target renders each step from random cameras and hands the guidance the geometry only (:class:`Views`:
elevation, azimuth, distance, camera-to-world). The guidance resolves the step's texts here, as threestudio's
prompt processor does (``prompt_processors/base.py``): DreamFusion's view-dependent prompting appends
``", <front|side|back|overhead> view"`` to each prompt, and Perp-Neg (Armandpour et al. 2023) adds the weights of
the two nearest views and the views to subtract (:class:`PerpNegViews`, combined in ``sdbridge.guidance.perp_neg``).

:class:`StepPrompts` is the result: the per-sample texts the guidance conditions on, plus what a method may need
besides them (the view-independent prompts VSD's LoRA is trained on, the cameras it is conditioned on, the Perp-Neg
views). :meth:`StepPrompts.map` edits the *prompts* and resolves the views again, so a modifier lands before the view
suffix, as in threestudio (``"<prompt>, ., front view"``, the 3D SDS-Bridge target text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

VIEWS = ("front", "side", "back", "overhead")

#: a representative (elevation, azimuth) in degrees of each view direction (for encoding every text before training)
VIEW_ANGLES = {"front": (0.0, 0.0), "side": (0.0, 90.0), "back": (0.0, 180.0), "overhead": (90.0, 0.0)}


def view_prompt(prompt: str, view: str) -> str:
    """threestudio's view-dependent text: ``"<prompt>, <view> view"``."""
    return f"{prompt}, {view} view"


def view_direction(elevation: float, azimuth: float, front: float = 45.0, back: float = 45.0,
                   overhead: float = 60.0) -> str:
    """DreamFusion's view-dependent prompting (threestudio's thresholds): ``overhead`` above ``overhead`` degrees of
    elevation, else ``front`` within ``front`` degrees of azimuth 0, ``back`` within ``back`` of 180, else ``side``."""
    if elevation > overhead:
        return "overhead"
    a = (azimuth + 180) % 360 - 180
    if abs(a) < front:
        return "front"
    if abs(a) > 180 - back:
        return "back"
    return "side"


@dataclass(frozen=True)
class TextMix:
    """The conditioning ``r * embedding(a) + (1 - r) * embedding(b)``: the view interpolation of threestudio's
    Perp-Neg prompt processor (``get_text_embeddings_perp_neg``: ``r_inter * front_emb + (1 - r_inter) * side_emb``)
    and of LucidDreamer (``train.py``). Passed to ``DiffusionPrior.encode_text`` in place of a text, on a prior
    that ``interpolates_text`` (others evaluate both texts and interpolate the predictions)."""

    a: str
    b: str
    r: float

    def __str__(self) -> str:
        return f"{self.r:.4g} x ({self.a}) + {1 - self.r:.4g} x ({self.b})"


@dataclass(frozen=True)
class Views:
    """The cameras of one step, one per sample: angles in degrees, ``c2w`` the ``(B, 4, 4)`` camera-to-world
    matrices (threestudio passes the same four to its guidances)."""

    elevation: torch.Tensor  # (B,)
    azimuth: torch.Tensor  # (B,)
    distance: torch.Tensor  # (B,)
    c2w: torch.Tensor  # (B, 4, 4)

    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    def cameras(self) -> torch.Tensor:
        """``(B, 16)`` flattened camera-to-world matrices (the camera condition of VSD's LoRA, as threestudio)."""
        return self.c2w.flatten(1).float()

    @staticmethod
    def at(elevation: Sequence[float], azimuth: Sequence[float], distance: float = 1.0) -> "Views":
        """Views at the given angles, with identity camera matrices (prompt resolution reads the angles only)."""
        n = len(elevation)
        return Views(torch.tensor(list(elevation), dtype=torch.float32), torch.tensor(list(azimuth), dtype=torch.float32),
                     torch.full((n,), float(distance)), torch.eye(4).expand(n, 4, 4).clone())


# ---------------------------------------------------------------------- Perp-Neg weights (threestudio's constants)
#: ``(a, b, c)`` of ``a exp(-b r) + c`` (threestudio ``prompt_processors/base.py``): front-side, side-front,
#: side-back, front-(side)-back.
F_FS = (4.0, 0.5, -2.426)
F_SF = (4.0, 0.5, -2.426)
F_SB = (1.0, 0.5, -0.606)
F_FSB = (1.0, 0.5, 0.967)


def decay(abc: tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


@dataclass
class PerpNegViews:
    """Per-sample Perp-Neg conditionings of a batch: ``eps_pos = mix * eps(pos_a) + (1 - mix) * eps(pos_b)``."""

    pos_a: list[str]
    pos_b: list[str]
    mix: torch.Tensor  # (B,)
    negatives: list[list[str]]  # 2 lists of B texts
    weights: torch.Tensor  # (B, 2), already negative (subtracted)

    def texts(self, mix_embeddings: bool = False) -> dict[str, list]:
        """The named conditionings: the positive as one :class:`TextMix` per sample (``"pos"``, threestudio's
        embedding interpolation) when ``mix_embeddings``, else its two texts (``"pos_a"``, ``"pos_b"``) whose
        predictions are interpolated (a prior whose texts do not mix: the exact one)."""
        pos = ({"pos": [TextMix(a, b, float(r)) for a, b, r in zip(self.pos_a, self.pos_b, self.mix.tolist())]}
               if mix_embeddings else {"pos_a": self.pos_a, "pos_b": self.pos_b})
        return {**pos, **{f"neg_{i}": list(n) for i, n in enumerate(self.negatives)}}


def perp_neg_views(prompts: Sequence[str], elevation: torch.Tensor, azimuth: torch.Tensor, uncond: str = "",
                   overhead_threshold: float = 60.0) -> PerpNegViews:
    """The Perp-Neg conditionings of ``prompts[i]`` seen from ``elevation[i]``, ``azimuth[i]`` (degrees); ``uncond``
    fills unused negative slots (weight 0). For azimuth |a| < 90: r = 1 - |a| / 90, pos = r front + (1 - r) side,
    negatives (front, side) with weights ``-f_fs(r)``, ``-f_sf(1 - r)``; otherwise r = 2 - |a| / 90,
    pos = r side + (1 - r) back, negatives (side, front) with ``-f_sb(r)``, ``-f_fsb(r)``; overhead views use the
    overhead text and no negatives (threestudio ``get_text_embeddings_perp_neg``)."""
    pos_a, pos_b, mix, neg0, neg1, weights = [], [], [], [], [], []
    for prompt, e, a in zip(prompts, elevation.tolist(), azimuth.tolist()):
        front, side, back, overhead = (view_prompt(prompt, v) for v in VIEWS)
        a = (a + 180) % 360 - 180
        if e > overhead_threshold:
            pos_a.append(overhead), pos_b.append(overhead), mix.append(1.0)
            neg0.append(uncond), neg1.append(uncond), weights.append((0.0, 0.0))
        elif abs(a) < 90:
            r = 1 - abs(a) / 90
            pos_a.append(front), pos_b.append(side), mix.append(r)
            neg0.append(front), neg1.append(side)
            weights.append((-decay(F_FS, r), -decay(F_SF, 1 - r)))
        else:
            r = 2 - abs(a) / 90
            pos_a.append(side), pos_b.append(back), mix.append(r)
            neg0.append(side), neg1.append(front)
            weights.append((-decay(F_SB, r), -decay(F_FSB, r)))
    return PerpNegViews(pos_a, pos_b, torch.tensor(mix), [neg0, neg1], torch.tensor(weights))


#: LucidDreamer's Perp-Neg (``arguments/__init__.py`` GuidanceParams at 2ecf093, set by none of its configs):
#: ``negative_w``, ``front_decay_factor``, ``side_decay_factor``
LUCID_NEGATIVE_W, LUCID_FRONT_DECAY, LUCID_SIDE_DECAY = -2.0, 2.0, 10.0


def luciddreamer_views(prompts: Sequence[str], azimuth: torch.Tensor) -> PerpNegViews:
    """LucidDreamer's view conditioning (``train.py`` 2ecf093: ``get_pos_neg_text_embeddings`` and its plain branch):
    no overhead view; for azimuth a in [-90, 90): r = 1 - |a| / 90, pos = r front + (1 - r) side, negatives (front,
    side) with weights ``-2 exp(-2 r)`` (0 when r > 0.8) and ``-2 exp(-10 (1 - r))`` (0 when r < 0.2); otherwise
    r = 2 - |a| / 90, pos = r side + (1 - r) back, negatives (side, front) with ``-exp(-10 r)`` (0 when r > 0.8) and
    -2. The positive is interpolated with or without Perp-Neg."""
    pos_a, pos_b, mix, neg0, neg1, weights = [], [], [], [], [], []
    for prompt, a in zip(prompts, azimuth.tolist()):
        front, side, back = (view_prompt(prompt, v) for v in ("front", "side", "back"))
        a = (a + 180) % 360 - 180
        if -90 <= a < 90:
            r = 1 - abs(a) / 90
            pos_a.append(front), pos_b.append(side), neg0.append(front), neg1.append(side)
            weights.append((0.0 if r > 0.8 else math.exp(-r * LUCID_FRONT_DECAY) * LUCID_NEGATIVE_W,
                            0.0 if r < 0.2 else math.exp(-(1 - r) * LUCID_SIDE_DECAY) * LUCID_NEGATIVE_W))
        else:
            r = 2 - abs(a) / 90
            pos_a.append(side), pos_b.append(back), neg0.append(side), neg1.append(front)
            weights.append((0.0 if r > 0.8 else math.exp(-r * LUCID_SIDE_DECAY) * LUCID_NEGATIVE_W / 2,
                            LUCID_NEGATIVE_W))
        mix.append(r)
    return PerpNegViews(pos_a, pos_b, torch.tensor(mix), [neg0, neg1], torch.tensor(weights))


#: how view-dependent prompting turns a camera into texts
VIEW_SCHEMES = ("threestudio", "luciddreamer")


# ---------------------------------------------------------------------- the prompt layer
@dataclass(frozen=True)
class ViewPrompting:
    """How a step's views change its texts (the 3D target's ``view_dependent_prompts``, ``perp_neg`` and thresholds;
    off for image targets, unless an image target is seen from one ``fixed_view``)."""

    enabled: bool = False
    perp_neg: bool = False
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    #: a 2D target's one view: its suffix on every prompt (threestudio's prompt processor at the notebooks' fixed
    #: camera, elevation 0 / azimuth 0: "<prompt>, front view")
    fixed_view: Optional[str] = None
    #: ``threestudio``: the suffix of the camera's view direction (and its Perp-Neg); ``luciddreamer``: every camera
    #: conditions on the interpolated embeddings of its two nearest views (:func:`luciddreamer_views`)
    scheme: str = "threestudio"

    def __post_init__(self) -> None:
        if self.fixed_view is not None and self.fixed_view not in VIEWS:
            raise ValueError(f"fixed view {self.fixed_view!r} is not one of {', '.join(VIEWS)}")
        if self.scheme not in VIEW_SCHEMES:
            raise ValueError(f"view scheme {self.scheme!r} is not one of {', '.join(VIEW_SCHEMES)}")

    def resolve(self, prompts: Sequence[str], views: Optional[Views] = None) -> "StepPrompts":
        """The texts of ``prompts`` (one per sample) seen from ``views``."""
        plain = list(prompts.plain) if isinstance(prompts, StepPrompts) else list(prompts)
        if views is not None and len(views) != len(plain):
            raise ValueError(f"got {len(plain)} prompts for {len(views)} views")
        if views is None and self.fixed_view is not None:
            return StepPrompts([view_prompt(p, self.fixed_view) for p in plain], plain=plain, prompting=self)
        if views is None or not self.enabled:
            return StepPrompts(plain, plain=plain, views=views, prompting=self)
        if self.scheme == "luciddreamer":
            lucid = luciddreamer_views(plain, views.azimuth.cpu())
            texts = [TextMix(a, b, r) for a, b, r in zip(lucid.pos_a, lucid.pos_b, lucid.mix.tolist())]
            return StepPrompts(texts, plain=plain, views=views, perp_neg=lucid if self.perp_neg else None,
                               prompting=self)
        texts = [view_prompt(p, view_direction(float(e), float(a), self.front_threshold, self.back_threshold,
                                               self.overhead_threshold))
                 for p, e, a in zip(plain, views.elevation.tolist(), views.azimuth.tolist())]
        perp = (perp_neg_views(plain, views.elevation.cpu(), views.azimuth.cpu(),
                               overhead_threshold=self.overhead_threshold) if self.perp_neg else None)
        return StepPrompts(texts, plain=plain, views=views, perp_neg=perp, prompting=self)

    def every_view(self, prompts: Sequence[str]) -> list["StepPrompts"]:
        """``prompts`` resolved once per view direction: every text a step can ask for (encoded before training)."""
        if not self.enabled:
            return [self.resolve(prompts)]
        out = []
        for view in VIEWS:
            e, a = VIEW_ANGLES[view]
            out.append(self.resolve(prompts, Views.at([e] * len(prompts), [a] * len(prompts))))
        return out


class StepPrompts(list):
    """The texts of one step, one per sample (what the guidance conditions on: a str, or a :class:`TextMix` of two
    views under the ``luciddreamer`` scheme), with

    * ``plain``: the same prompts without view suffixes (VSD's LoRA text in 3D, as threestudio),
    * ``views``: the step's cameras (None for image targets),
    * ``perp_neg``: the Perp-Neg conditionings of the views (None unless ``target.perp_neg=true``).
    """

    def __init__(self, texts: Sequence[str], *, plain: Optional[Sequence[str]] = None, views: Optional[Views] = None,
                 perp_neg: Optional[PerpNegViews] = None, prompting: Optional[ViewPrompting] = None):
        super().__init__(texts)
        self.plain = list(texts if plain is None else plain)
        self.views = views
        self.perp_neg = perp_neg
        self.prompting = prompting or ViewPrompting()

    @staticmethod
    def of(prompts: Sequence[str]) -> "StepPrompts":
        """``prompts`` as step prompts (a plain list: no views)."""
        return prompts if isinstance(prompts, StepPrompts) else StepPrompts(list(prompts))

    def map(self, edit: Callable[[str], str]) -> "StepPrompts":
        """``edit`` applied to each prompt, with the views resolved again (the edit lands before the view suffix)."""
        return self.prompting.resolve([edit(p) for p in self.plain], self.views)


def edited(prompts: Sequence[str], edit: Callable[[str], str]) -> StepPrompts:
    """``edit`` applied to a step's prompts (see :meth:`StepPrompts.map`); a plain list is taken as view-less."""
    return StepPrompts.of(prompts).map(edit)


__all__ = ["PerpNegViews", "StepPrompts", "TextMix", "VIEWS", "VIEW_SCHEMES", "luciddreamer_views", "ViewPrompting", "Views", "decay", "edited", "perp_neg_views",
           "view_direction", "view_prompt"]
