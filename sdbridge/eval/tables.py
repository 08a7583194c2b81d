"""Collect run summaries of a sweep into the paper-style comparison table.

    method | FID | CLIP-FID | time per image | NFEs per iteration | images

One row per method: the runs of a method (its shards) are merged, checked to cover their shards exactly once, and
scored together (FID over the merged images against the reference statistics of the merged samples' real images).
Runs made under different protocols (prior, steps, resolution, prompt set, seed) are never mixed silently:
:func:`collect` raises :class:`ProtocolMismatch` naming what differs, unless asked for one table per protocol.
FID needs the real images of the captions (COCO); on the exact prior (``prior=analytic``) the exact metrics of
sdbridge/metrics/exact.py are reported (FD per prompt needs several images per prompt, NLL does not).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence


class ProtocolMismatch(ValueError):
    """Runs of a sweep were made under different protocols."""


@dataclass
class MethodRuns:
    """The runs (shards) of one method under one protocol."""

    method: str
    protocol: dict[str, Any]
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def samples(self) -> list[dict[str, Any]]:
        return [s for summary in self.summaries for s in summary["samples"]]

    def coverage(self) -> tuple[int, list[int]]:
        """``(num_shards, missing shard indices)``; raises on a duplicated shard or sample."""
        num = {s["prompt_set"].get("num_shards", 1) for s in self.summaries}
        if len(num) != 1:
            raise ProtocolMismatch(f"{self.method}: runs split the prompt set into different shard counts {sorted(num)}")
        n = num.pop()
        seen: dict[int, str] = {}
        for s in self.summaries:
            shard = s["prompt_set"].get("shard", 0)
            if shard in seen:
                raise ProtocolMismatch(f"{self.method}: shard {shard} of {n} appears twice ({seen[shard]} and "
                                       f"{s['run_dir']}); remove one run")
            seen[shard] = s["run_dir"]
        keys = [x["key"] for x in self.samples]
        if len(keys) != len(set(keys)):
            raise ProtocolMismatch(f"{self.method}: a sample appears in two runs")
        return n, [i for i in range(n) if i not in seen]


def find_summaries(sweep_dir: str | Path, damaged: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every run-level ``summary.json`` under ``sweep_dir`` (batch-level summaries are part of their run's).

    A summary that cannot be read (truncated, not JSON, not a run's summary) raises a ``ValueError`` naming the
    file; with a ``damaged`` list, it is skipped and a one-line reason naming it is appended there instead, so a
    table can still be made from the other runs (a skipped shard then shows as missing in its method's row).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep directory {root}")
    found = []
    skipped: list[str] = []
    for path in sorted(root.rglob("summary.json")):
        if "batches" in path.relative_to(root).parts[:-1]:
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: truncated / invalid JSON, bytes that are not UTF-8
            problem = f"{path} is not a readable summary ({type(err).__name__}: {err}); rerun or resume that run"
        else:
            if isinstance(summary, dict) and "protocol" in summary and "samples" in summary:
                found.append(summary)
                continue
            problem = (f"{path} was written by an older sdbridge (no protocol/samples); rerun it"
                       if isinstance(summary, dict) else f"{path} is not a run's summary (a JSON "
                       f"{type(summary).__name__}); rerun or resume that run")
        if damaged is None:
            raise ValueError(problem)
        skipped.append(problem)
    if damaged is not None:
        damaged.extend(skipped)
    if not found:
        if skipped:
            raise ValueError(f"no readable summary.json under {root}: {skipped[0]}")
        raise FileNotFoundError(f"no summary.json under {root}: is it a finished run or sweep directory?")
    return found


def _key(protocol: dict[str, Any]) -> str:
    return json.dumps(protocol, sort_keys=True, default=str)


def describe_differences(protocols: Sequence[dict[str, Any]]) -> str:
    keys = sorted({k for p in protocols for k in p})
    lines = []
    for k in keys:
        values = {json.dumps(p.get(k), sort_keys=True, default=str) for p in protocols}
        if len(values) > 1:
            lines.append(f"  {k}: {' vs '.join(sorted(values))}")
    return "\n".join(lines)


def collect(summaries: Sequence[dict[str, Any]], by_protocol: bool = False) -> list[list[MethodRuns]]:
    """Group runs by protocol, then by method. One group unless ``by_protocol``; mixing raises."""
    groups: dict[str, dict[str, MethodRuns]] = {}
    for s in summaries:
        methods = groups.setdefault(_key(s["protocol"]), {})
        methods.setdefault(s["guidance"], MethodRuns(s["guidance"], s["protocol"])).summaries.append(s)
    if len(groups) > 1 and not by_protocol:
        protocols = [json.loads(k) for k in groups]
        raise ProtocolMismatch(
            f"the runs were made under {len(groups)} different protocols, which one table would mix:\n"
            f"{describe_differences(protocols)}\nPass --by-protocol for one table per protocol, or collect one "
            "sweep directory at a time."
        )
    return [list(methods.values()) for methods in groups.values()]


def _analytic_prior(summary: dict[str, Any], built: dict[str, Any]):
    """The exact prior a run used (its ``config.yaml``'s prior section; the default one if the file is missing),
    built once per distinct config."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

    saved = Path(summary["run_dir"]) / "config.yaml"
    section = OmegaConf.to_container(OmegaConf.load(saved)).get("prior", {}) if saved.is_file() else {}
    names = {f.name for f in fields(AnalyticConfig)} - {"device"}
    kwargs = {k: v for k, v in section.items() if k in names}
    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in built:
        built[key] = AnalyticPrior(AnalyticConfig(device="cpu", **kwargs))
    return built[key]


def _merged_exact_metrics(runs: MethodRuns, built: dict[str, Any]) -> dict[str, float]:
    import torch

    from sdbridge.metrics.exact import exact_metrics

    files = [p for s in runs.summaries for p in (
        [s["model_samples"]] if "model_samples" in s else
        [str(Path(d) / "model_samples.pt") for d in s.get("batch_dirs", [])])]
    samples = torch.cat([torch.load(f, weights_only=True) for f in files])
    prior = _analytic_prior(runs.summaries[0], built)
    return exact_metrics(prior, samples, [x["prompt"] for x in runs.samples])["mean"]


def score(group: Sequence[MethodRuns], fid_features: Optional[str] = "inception",
          clip_features: Optional[str] = "clip", cache_dir: str | Path = "~/.cache/sdbridge/fid",
          device: str | None = None) -> list[dict[str, Any]]:
    """One row per method of one protocol: FID / CLIP-FID (or exact metrics), time and cost."""
    from sdbridge.callbacks.summary import cost_totals
    from sdbridge.metrics import fid as fidlib

    extractors: dict[str, Any] = {}
    priors: dict[str, Any] = {}  # exact priors, built once per distinct config

    def extractor(name: str):
        if name not in extractors:
            extractors[name] = fidlib.build_extractor(name, device)
        return extractors[name]

    rows = []
    for runs in sorted(group, key=lambda r: r.method):
        num_shards, missing = runs.coverage()
        samples = runs.samples
        cost = cost_totals(runs.summaries)
        row: dict[str, Any] = {
            "method": runs.method,
            "images": len(samples),
            "time_per_image_s": cost["time_per_image_s"],
            "ms_per_iteration": cost["ms_per_step"],
            "nfe_per_iteration": cost["nfe_per_step"],
            "peak_memory_mb": cost["peak_memory_mb"],
            "shards": f"{num_shards - len(missing)}/{num_shards}",
            "missing_shards": missing,
        }
        reals = [x.get("image") for x in samples]
        if None not in reals:  # real images of the same captions (COCO): FID and CLIP-FID
            files = [x.get("file") for x in samples]
            if None in files:
                raise ValueError(f"{runs.method}: some samples have no image file in their summary")
            for column, name in (("fid", fid_features), ("clip_fid", clip_features)):
                if name:
                    ex = extractor(name)
                    reference = fidlib.reference_statistics(reals, ex, cache_dir, crop=True)
                    row[column] = fidlib.fid(files, reference, ex)
        if runs.protocol.get("prior") == "analytic":  # the true distributions are known: exact metrics
            row.update({f"exact_{k}": v for k, v in _merged_exact_metrics(runs, priors).items()})
        rows.append(row)
    return rows


def _fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.2f} min" if seconds >= 60 else f"{seconds:.2f} s"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], protocol: dict[str, Any], skipped: Sequence[str] = ()) -> str:
    """The table in Markdown; ``skipped``: unreadable summaries left out (listed under the table)."""
    names = {"fid": "FID", "clip_fid": "CLIP-FID", "exact_fd": "FD (exact)", "exact_nll_bpd": "NLL bits/dim (exact)"}
    columns = [k for k in names if any(k in r for r in rows)]
    quality = ([names[k] for k in columns], columns)
    head = ["method", *quality[0], "time per image", "NFEs per iteration", "ms per iteration", "peak memory",
            "images", "shards"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *(_fmt(r.get(k)) for k in quality[1]), _fmt_time(r["time_per_image_s"]),
                 _fmt(r["nfe_per_iteration"]), _fmt(r["ms_per_iteration"], 1), f"{r['peak_memory_mb'] / 1024:.2f} GB",
                 str(r["images"]), r["shards"] + (" (incomplete)" if r["missing_shards"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    p = protocol
    prompts = p.get("prompts", {})
    lines += ["", f"Protocol: prior `{p.get('prior')}`, target `{p.get('target')}`, sample shape "
              f"{p.get('sample_shape')}, {p.get('steps')} steps, seed {p.get('seed')}, prompts "
              f"{json.dumps(prompts, sort_keys=True)}."]
    if skipped:
        lines += ["", f"**Left out: {len(skipped)} unreadable summary.json** (their runs are missing from the rows "
                  "above):", *(f"- {s}" for s in skipped)]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    return out.getvalue()
