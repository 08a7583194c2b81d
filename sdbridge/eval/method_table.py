"""The README's method table, generated from the code and the shipped configs (``python -m sdbridge.eval.method_table``).

A test checks that the README holds exactly this table, so it cannot drift from what the code does.
"""

from __future__ import annotations

from pathlib import Path

from sdbridge.config import SCHEMAS
from sdbridge.guidance.base import BridgeGrid

CONF = Path(__file__).resolve().parents[2] / "conf"


def schedule_label(sched) -> str:
    name = next(n for n, c in SCHEMAS["scheduler"].items() if type(sched) is c)
    lo, hi = sched.min_step_ratio, sched.max_step_ratio
    if name == "anneal":
        return f"anneal {hi:g} → {lo:g}"
    if name == "shrinking_max":
        return f"uniform [{lo:g}, {sched.max_step_ratio_start:g} → {hi:g} over {sched.warmup_steps} steps]"
    return f"{name} [{lo:g}, {hi:g}]"


def method_rows() -> list[dict[str, str]]:
    from sdbridge.eval.protocol import compose_run_config

    rows = []
    for yaml in sorted((CONF / "guidance").glob("*.yaml")):
        name = yaml.stem
        config, cfg = compose_run_config([f"guidance={name}"])
        cls = type(config.guidance).builds
        g = config.guidance
        summary = dict(cls.SUMMARY)
        if g.full_bridge:
            summary["eps_tgt"] = f"full bridge: PF-ODE generation with {summary['eps_tgt']}"
            summary["eps_src"] = f"full bridge: PF-ODE inversion with {summary['eps_src']}"
            upto = "up to " if g.bridge_grid is BridgeGrid.fixed else ""  # the fixed grid: fewer steps below t = 1000
            summary["nfe"] = f"{upto}{g.bridge_steps} x (source + 2)"
        rows.append({
            "method": name,
            "eps_tgt": summary["eps_tgt"],
            "eps_src": summary["eps_src"],
            "noise": summary["noise"],
            "w": g.weighting.value,
            "t": schedule_label(config.scheduler),
            "scale": f"{g.scale:g}",
            "nfe": summary["nfe"],
        })
    return rows


def methods_markdown() -> str:
    from hydra.core.global_hydra import GlobalHydra

    lines = [
        "| `guidance=` | eps_tgt | eps_src | x_t / noise | w(t) | t schedule | s | NFEs per step |",
        "| --- | --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for r in method_rows():
        lines.append(f"| `{r['method']}` | {r['eps_tgt']} | {r['eps_src']} | {r['noise']} | {r['w']} | {r['t']} | "
                     f"{r['scale']} | {r['nfe']} |")
    GlobalHydra.instance().clear()
    return "\n".join(lines)


if __name__ == "__main__":
    print(methods_markdown())
