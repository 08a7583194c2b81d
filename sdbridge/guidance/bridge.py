"""SDS-Bridge (McAllister et al., "Rethinking Score Distillation as a Bridge Between Image Distributions", 2024).

Stage 1 (step < ``stage_two_start_step``) is SDS. Stage 2 describes the current distribution with text:

    grad = w(t) * s * ( eps(x_t; y + tgt_mod) - eps(x_t; y + src_mod) )

i.e. eps_tgt = CFG_s with "uncond" = y + src_mod and "cond" = y + tgt_mod, eps_src = eps(y + src_mod): one
batched call of 2 conditionings, the cost of SDS. Defaults from davidmcall/SDS-Bridge (``2D_experiments``): s = 40
in both stages, switch at step 500 of 1000, the modifiers below appended to the prompt. The stage is a function of
the step (``step >= stage_two_start_step``), so a run resumed past the switch stays in stage 2 (the 3D reference
code switches on ``step == 20000`` and never does). The 3D code (``threestudio-sds-bridge``, ``configs/sds-bridge.yaml``)
gives stage 2 w(t) = 1 and s = 1 (``stage_two_weight: 1.``) and the target modifier "." (the prompt processor joins
with ", "): ``experiment=nerf_bridge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sdbridge.guidance.base import Guidance, GuidanceConfig, Weighting, as_enum, cfg_sum
from sdbridge.views import edited
from sdbridge.registry import builds

SOURCE_MODIFIER = ", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
TARGET_MODIFIER = ", detailed high resolution, high quality, sharp"


@dataclass
class BridgeConfig(GuidanceConfig):
    scale: float = 40.0  # stage 1 (SDS) CFG scale
    stage_two_scale: float = 40.0
    stage_two_start_step: int = 500
    source_modifier: str = SOURCE_MODIFIER
    target_modifier: str = TARGET_MODIFIER
    #: w(t) of stage 2 (None: ``weighting``, as the 2D code). The 3D code (``sds_bridge_guidance.py``,
    #: ``weighting_strategy: uniform``) weighs stage 1 by 1 - abar_t inside its formula and stage 2 by 1.
    stage_two_weighting: Optional[Weighting] = None
    #: appended to the prompt in stage 1 (the 2D code: nothing; the 3D code conditions its SDS stage on the target
    #: text, prompt + ", .")
    stage_one_modifier: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage_two_weighting is not None:
            self.stage_two_weighting = as_enum(Weighting, self.stage_two_weighting, "guidance.stage_two_weighting")


def with_modifier(prompts, modifier: str):
    """``prompts`` with ``modifier`` appended, before any view suffix (:meth:`sdbridge.views.StepPrompts.map`)."""
    return edited(prompts, lambda p: p + modifier)


@builds("guidance", "bridge", BridgeConfig)
class Bridge(Guidance):
    SUMMARY = {"eps_tgt": "stage 1: CFG_s(x_t; y); stage 2: CFG_s with uncond y + src_mod, cond y + tgt_mod", "eps_src": "stage 1: kappa; stage 2: eps(x_t; y + src_mod)", "noise": "fresh N(0, I)", "nfe": "2"}

    def stage(self, step: int) -> int:
        return 2 if step >= self.config.stage_two_start_step else 1

    def weighting(self, step):
        if step is not None and self.stage(step) == 2 and self.config.stage_two_weighting is not None:
            return self.config.stage_two_weighting
        return self.config.weighting

    def text_change_steps(self):
        return [self.config.stage_two_start_step]

    def target_texts(self, prompts, step):
        if self.stage(step) == 1:
            return super().target_texts(with_modifier(prompts, self.config.stage_one_modifier), step)
        return {
            "src": list(with_modifier(prompts, self.config.source_modifier)),
            "tgt": list(with_modifier(prompts, self.config.target_modifier)),
        }

    def target_weights(self, prompts, step):
        if self.stage(step) == 1:
            return super().target_weights(with_modifier(prompts, self.config.stage_one_modifier), step)
        return cfg_sum(self.config.stage_two_scale, "src", "tgt")

    def target_from(self, eps, x_t, t, prompts, step):  # stage 1 with Perp-Neg views
        return super().target_from(eps, x_t, t, with_modifier(prompts, self.config.stage_one_modifier), step)

    def source_texts(self, prompts, step):
        if self.stage(step) == 1:
            return {}
        return {"src": list(with_modifier(prompts, self.config.source_modifier))}

    def source_from(self, eps, x_t, t, kappa, prompts, step):
        if self.stage(step) == 1:
            return super().source_from(eps, x_t, t, kappa, prompts, step)
        return eps["src"]
