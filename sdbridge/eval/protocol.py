"""The exact-prior comparison protocol: every guidance, plus DDIM and true samples, scored by exact metrics.

Used by ``experiments/exact/make_table.py`` and the science tests, so the table and the claims checked in CI are
produced by the same code.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class ExactProtocol:
    prompts: list[str] = field(
        default_factory=lambda: ["a red circle", "a blue square", "a circle"]
    )
    images_per_prompt: int = 16
    steps: int = 1000  # the official 2D step count (Bridge paper's code)
    seed: int = 0
    ddim_steps: int = 50
    overrides: list[str] = field(default_factory=list)  # extra overrides for every method run
    #: "analytic" (the closed-form eps) or "learned" (a network trained on the same world: sdbridge/priors/learned.py)
    prior: str = "analytic"

    def image_prompts(self) -> list[str]:
        """The prompt of each image, in the order runs and reference rows produce them (prompt by prompt)."""
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]

    def describe(self) -> str:
        from sdbridge.priors.analytic import AnalyticConfig
        from sdbridge.priors.learned import LEARNED_VERSION, LearnedConfig
        from sdbridge.priors.world import WORLD_VERSION

        # the world's and the text model's defaults (and the network's) are part of what a result was measured on
        text = LearnedConfig() if self.prior == "learned" else AnalyticConfig()
        network = (f", a UNet of widths {list(text.channels)} trained {text.train_steps} steps on it (learned prior "
                   f"v{LEARNED_VERSION}, seed {text.train_seed}"
                   + (f", difference loss x{text.difference_weight:g}" if text.difference_weight else "")
                   + ") as the eps") if self.prior == "learned" else ""
        return (
            f"prior={self.prior} ({text.size}x{text.size}, world v{WORLD_VERSION}, text contrast "
            f"{text.text_contrast:g}, shape pull {text.text_pull:g}{network}), prompts {self.prompts}, "
            f"{self.images_per_prompt} images per prompt, "
            f"{self.steps} steps, seed {self.seed}, each method with its conf/guidance defaults"
            + (f", overrides {' '.join(self.overrides)}" if self.overrides else "")
        )


def compose_config(overrides: Sequence[str] = ()):
    """Compose ``conf/config.yaml`` with overrides, as ``python run.py`` does (without range checks or running)."""
    from hydra import compose, initialize_config_dir

    import sdbridge.config  # noqa: F401  (registers schemas and resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_run_config(overrides: Sequence[str]):
    """Composed config as typed objects (range checks run) and as the DictConfig."""
    from sdbridge.config import to_objects

    cfg = compose_config(overrides)
    return to_objects(cfg), cfg


def run_method(guidance: str, protocol: ExactProtocol, extra: Sequence[str] = (), run_dir: Path | None = None) -> dict:
    """Optimize the protocol's images with ``guidance`` on the exact prior; returns the run summary."""
    from sdbridge.runner import run

    overrides = [
        f"prior={protocol.prior}",
        f"guidance={guidance}",
        f"prompt.texts=[{','.join(protocol.prompts)}]",
        f"prompt.repeat={protocol.images_per_prompt}",
        f"trainer.max_steps={protocol.steps}",
        f"seed={protocol.seed}",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every=0",
        "trainer.save_every=0",
        "logger=none",
        *protocol.overrides,
        *extra,
    ]
    config, _ = compose_run_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(config, run_dir or Path(tmp))
        if summary.get("model_samples"):  # keep the final images: the run folder may be temporary
            summary["samples_x0"] = torch.load(summary["model_samples"], weights_only=True)
    summary["overrides"] = overrides
    return summary


def reference_rows(prior: Any, protocol: ExactProtocol, scales: Sequence[float] = (1.0, 7.5)) -> dict[str, dict]:
    """Metrics of exact samples and of DDIM samples (exact eps, eta 0) at the CFG ``scales`` for the protocol's
    prompts."""
    from sdbridge.metrics.exact import exact_metrics
    from sdbridge.sampling import ddim_sample

    prompts = protocol.image_prompts()
    gen = torch.Generator().manual_seed(protocol.seed)
    start = time.perf_counter()
    true = torch.cat([prior.sample(p, protocol.images_per_prompt, gen) for p in protocol.prompts])
    t_true = time.perf_counter() - start
    rows = {"true samples": {"exact_metrics": exact_metrics(prior, true, prompts), "wall_clock_s": t_true,
                             "nfe_per_step": None, "steps": 0, "samples": true}}
    for scale in scales:
        nfe0 = prior.nfe
        start = time.perf_counter()
        ddim = ddim_sample(prior, prompts, num_steps=protocol.ddim_steps, scale=scale, generator=gen)
        name = f"DDIM {protocol.ddim_steps} steps" + ("" if scale == 1.0 else f", CFG {scale:g}")
        rows[name] = {"exact_metrics": exact_metrics(prior, ddim, prompts), "wall_clock_s": time.perf_counter() - start,
                      "steps": protocol.ddim_steps, "nfe_per_step": (prior.nfe - nfe0) / protocol.ddim_steps,
                      "samples": ddim}
    return rows


def markdown_table(rows: dict[str, dict]) -> str:
    """Method | FD | NLL | collapse | sharpness | saturation | adherence | NFEs/step | time — means over prompts."""
    head = ("| method | FD ↓ | NLL (bits/dim) ↓ | collapse ↓ | sharpness (1 = true) | saturation (1 = true) | "
            "adherence ↑ | NFEs/step | time (s) |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        m = row["exact_metrics"]["mean"]
        nfe = row.get("nfe_per_step")
        lines.append(
            f"| {name} | {m['fd']:.1f} | {m['nll_bpd']:.2f} | {m['collapse']:.3f} | {m['sharpness']:.3f} | "
            f"{m.get('saturation', float('nan')):.3f} | {m.get('adherence', float('nan')):.2f} | "
            f"{'—' if nfe is None else f'{nfe:.3g}'} | {row['wall_clock_s']:.1f} |"
        )
    return "\n".join(lines)


def per_prompt_table(rows: dict[str, dict], metric: str = "fd") -> str:
    prompts = list(next(iter(rows.values()))["exact_metrics"]["per_prompt"])
    lines = ["| method | " + " | ".join(p or "(empty)" for p in prompts) + " |",
             "| --- |" + " ---: |" * len(prompts)]
    for name, row in rows.items():
        pp = row["exact_metrics"]["per_prompt"]
        lines.append(f"| {name} | " + " | ".join(f"{pp[p][metric]:.{1 if metric == 'fd' else 2}f}" for p in prompts) + " |")
    return "\n".join(lines)
