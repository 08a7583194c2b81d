"""Regenerate experiments/exact/README.md: every implemented guidance on the exact prior, scored exactly.

    python experiments/exact/make_table.py            # the full protocol (a few minutes on a laptop CPU)
    python experiments/exact/make_table.py --quick    # 2 prompts x 8 images x 200 steps, to try it out
    python experiments/exact/make_table.py --methods sdi vsd   # rerun two methods, keep the others' results
    python experiments/exact/make_table.py --from-truth   # the same, every image starting at an exact sample
    python experiments/exact/make_table.py --world contrast_std=0.35 text_adherence=0.99   # on a variant world
    python experiments/exact/make_table.py --learned   # prior=learned: a network trained on the world as the eps

``--from-truth`` (``target.init=samples``) measures what each method does to images that already are the truth (a
method whose fixed point is the data keeps them); its table is a section of its own in the README, kept when the
main table is regenerated and vice versa. ``--world KEY=VALUE ...`` runs the table's protocol on a variant of the
exact world (``prior.KEY=VALUE`` for every method run and for the reference rows; keys are ``AnalyticConfig``'s), in
a README section of its own: how to measure a world change side by side with the table before making it the default.
``--learned`` runs it with ``prior=learned`` (its default 16 px world and shipped network; the DDIM rows
are then the network's samples, the true samples and every metric the world's), in a section of its own.

Each method's summary is kept in ``results.json`` beside the README, keyed by the protocol, so a table can be
rebuilt method by method (an interrupted run loses only the method it was on) and a rerun of some methods keeps
the others' numbers. ``--fresh`` ignores this protocol's stored results (the others' are kept); ``--no-run`` only
rewrites the README from them.
Each method's final images are kept too, outside the repository (``~/.cache/sdbridge/tables/<protocol hash>/``, written
atomically): ``--rescore`` recomputes every stored method's metrics from them with the current metric code (a changed
metric or classifier rescored in seconds instead of rerunning an hour of methods); a method whose images are not
there is named and rerun.

Methods are run with their conf/guidance/<name>.yaml defaults; DDIM (exact eps, eta 0, CFG 1) and exact samples are
the reference rows. New guidances appear by rerunning it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]

import torch

from sdbridge.files import atomic_open, write_text
from sdbridge.eval.protocol import ExactProtocol, markdown_table, per_prompt_table, reference_rows, run_method
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior
from sdbridge.priors.learned import LearnedConfig, LearnedPrior


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def save_grid(prior, x0: torch.Tensor, protocol: ExactProtocol, path: Path, per_row: int = 8) -> None:
    """One row per prompt (its first ``per_row`` images), each image upsampled to 128 px."""
    from sdbridge.media import comparison_grid, save_png

    n = protocol.images_per_prompt
    rows = [prior.decode(x0[i * n: i * n + per_row].to(prior.device)).cpu() for i in range(len(protocol.prompts))]
    save_png(comparison_grid(rows), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small protocol, for trying the script")
    names = sorted(p.stem for p in (ROOT / "conf" / "guidance").glob("*.yaml"))
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {names}")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "exact" / "README.md")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun every method of this protocol, ignoring its stored results (other protocols' kept)")
    parser.add_argument("--no-run", action="store_true", help="only rewrite the README from results.json")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute stored methods' metrics from their kept final images (rerun those without)")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--from-truth", action="store_true",
                         help="start every image at an exact sample of its prompt (target.init=samples)")
    variant.add_argument("--world", nargs="+", metavar="KEY=VALUE", default=None,
                         help="a variant of the exact world (AnalyticConfig fields), e.g. contrast_std=0.35")
    variant.add_argument("--learned", action="store_true",
                         help="prior=learned: the exact world with a network trained on it as the eps")
    args = parser.parse_args()

    world = world_config(args.world or [], parser)
    overrides = [FROM_TRUTH] if args.from_truth else [world_override(kv, world) for kv in args.world or []]
    kind = "from_truth" if args.from_truth else "world" if args.world else "learned" if args.learned else ""
    prior_name = "learned" if args.learned else "analytic"
    protocol = ExactProtocol(overrides=overrides, prior=prior_name)
    if args.quick:
        protocol = ExactProtocol(prompts=["a red circle", "a circle"], images_per_prompt=8, steps=200,
                                 overrides=overrides, prior=prior_name)
    store_path = args.out.with_name("results.json")
    store = load_store(store_path, protocol.describe(), args.fresh)
    stored = store.get(protocol.describe(), {})
    prior = LearnedPrior(LearnedConfig(device="cpu")) if args.learned else AnalyticPrior(AnalyticConfig(device="cpu",
                                                                                                      **world))
    kept = samples_dir(protocol)
    rescored, unkept = rescore(prior, protocol, stored, kept) if args.rescore else ([], [])
    if rescored:
        print(f"rescored from {kept}: {', '.join(rescored)}")
        store[protocol.describe()] = stored
        write_text(store_path, json.dumps(store, indent=1, sort_keys=True))
    to_run = [] if args.no_run else args.methods or [n for n in names if n not in stored] + unkept
    rows = reference_rows(prior, protocol, scales=() if args.from_truth else (1.0, 7.5))
    grids = args.out.parent / "grids" / kind
    for name, row in rows.items():
        save_grid(prior, row.pop("samples"), protocol, grids / f"{slug(name)}.png")
    for name in to_run:
        start = time.perf_counter()
        summary = run_method(name, protocol)
        x0 = summary.pop("samples_x0")
        save_grid(prior, x0, protocol, grids / f"{slug(name)}.png")
        with atomic_open(kept / f"{name}.pt") as f:
            torch.save(x0.detach().cpu(), f)
        print(f"{name}: {json.dumps(summary['exact_metrics']['mean'])} ({time.perf_counter() - start:.0f} s)")
        stored[name] = {k: summary[k] for k in ("exact_metrics", "nfe_per_step", "wall_clock_s", "overrides")
                        if k in summary}
        store[protocol.describe()] = stored
        write_text(store_path, json.dumps(store, indent=1, sort_keys=True))  # atomic: a kill keeps the old file
    for name in names:
        if name in stored:
            rows[name] = stored[name]
    missing = [n for n in names if n not in stored]
    pending = (f"\n**Not yet measured with this protocol:** {', '.join(missing)} (the script runs only these "
               "next time).\n") if missing else ""
    command = "python experiments/exact/make_table.py" + (" --quick" if args.quick else "") + (
        " --from-truth" if args.from_truth else "") + (" --world " + " ".join(args.world) if args.world else "") + (
        " --learned" if args.learned else "")
    old = args.out.read_text() if args.out.exists() else ""
    if kind:
        write_section(args.out, old, kind, variant_section(kind, rows, protocol, command, pending))
        return
    text = f"""# The exact-prior table

Every implemented guidance optimizes images on the exact prior (`prior=analytic`), whose true distribution is known,
so each method is scored against ground truth rather than a feature network. Reference rows: exact samples of the
true distribution, and DDIM with the exact eps (what the prior itself can do).

Regenerate with `{command}` ({'quick protocol' if args.quick else 'full protocol'}).

**Protocol.** {protocol.describe()}. Metrics (sdbridge/metrics/exact.py) are computed per prompt on the model-space
images (unclamped) and averaged over prompts: FD = Frechet distance to the prompt's exact mean and covariance in model
space (unit variance: with 16 images in 3,072 dimensions exact samples themselves score ~900–1,800, all finite-sample
bias), NLL in bits/dim under the exact density,
collapse = 1 - (spread of the images / spread of the true distribution), sharpness = high-frequency energy relative
to its exact expectation (1 = as sharp as the truth, < 1 over-smoothed), saturation = mean squared chroma relative to
its exact expectation, adherence = share of images the nearest-template classifier reads, recognizably, as one of
the prompt's concepts (exact samples reach 0.9: the prompt keeps 10% of its mass off its concepts). Time is the wall-clock of the whole run on
this machine ({platform.processor() or platform.machine()}, torch {torch.__version__}, CPU).

{markdown_table(rows)}
{pending}
FD per prompt:

{per_prompt_table(rows, 'fd')}

Adherence per prompt (share of images the nearest-template classifier reads as the prompt's concept):

{per_prompt_table(rows, 'adherence')}

Images (one row per prompt: {', '.join(repr(p) for p in protocol.prompts)}; the first 8 of each):

{chr(10).join(f"**{name}**{chr(10)}{chr(10)}![{name}](grids/{slug(name)}.png){chr(10)}" for name in rows)}

Overrides of each method run: `{' '.join(next(iter(v for k, v in rows.items() if 'overrides' in v))['overrides']) if len(rows) > 2 else ''}`
"""
    # keep the from-truth table, the calibration table (experiments/exact/calibrate.py) and the hand-written
    # analysis of the previous version (between their markers) below the regenerated numbers
    kept = [section(old, name) for name in SECTIONS]
    write_text(args.out, text + "\n" + "\n\n".join(kept) + "\n")
    print(f"wrote {args.out}")


FROM_TRUTH = "target.init=samples"


def samples_dir(protocol: ExactProtocol) -> Path:
    """Where the protocol's final images are kept (outside the repository: ~0.6 MB per method)."""
    key = hashlib.sha1(protocol.describe().encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~/.cache/sdbridge/tables")) / key


def rescore(prior, protocol: ExactProtocol, stored: dict, kept: Path) -> tuple[list[str], list[str]]:
    """Recompute the metrics of every stored method whose final images are kept; returns (rescored, not kept)."""
    from sdbridge.metrics.exact import exact_metrics

    prompts = protocol.image_prompts()
    done, missing = [], []
    for name, row in stored.items():
        path = kept / f"{name}.pt"
        if not path.exists():
            missing.append(name)
            continue
        x0 = torch.load(path, weights_only=True)
        if x0.shape[0] != len(prompts):
            sys.exit(f"make_table: error: {path} holds {x0.shape[0]} images, the protocol {len(prompts)}; "
                     "delete it or rerun the method")
        row["exact_metrics"] = exact_metrics(prior, x0.to(prior.device), prompts)
        done.append(name)
    if missing:
        print(f"rescore: no kept images for {', '.join(missing)} (run before they were kept): rerunning them")
    return done, missing
#: the README's parts below the main table, in order
SECTIONS = ("from_truth", "world", "learned", "calibration", "analysis")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section(text: str, name: str) -> str:
    """The README's ``name`` section with its markers (empty markers when it has none yet)."""
    start, end = markers(name)
    return text[text.index(start): text.index(end) + len(end)] if start in text and end in text else f"{start}\n{end}"


def write_section(path: Path, text: str, name: str, body: str) -> None:
    """Replace section ``name`` of the README (or put it before the next section that exists, else at the end)."""
    start, end = markers(name)
    new = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + new + text[text.index(end) + len(end):]
    else:
        later = [markers(n)[0] for n in SECTIONS[SECTIONS.index(name) + 1:] if markers(n)[0] in text]
        at = text.index(later[0]) if later else len(text)
        text = text[:at] + new + "\n\n" + text[at:]
    write_text(path, text)
    print(f"wrote section {name} of {path}")


def load_store(path: Path, key: str, fresh: bool) -> dict:
    """The stored results of every protocol (``results.json``). ``fresh``: without this protocol's (``key``), so its
    methods all rerun; the other protocols' results are kept (an unreadable file is then started afresh, as the error
    without ``fresh`` offers)."""
    try:
        store = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError as err:  # truncated or not JSON: say which file, and how to get a good one back
        if fresh:
            return {}
        sys.exit(f"make_table: error: {path} is not readable JSON ({err}); restore it with `git checkout "
                 f"{path}` or rerun every method with --fresh")
    if fresh:
        store.pop(key, None)
    return store


def world_config(pairs: list[str], parser: argparse.ArgumentParser) -> dict:
    """``KEY=VALUE`` strings -> AnalyticConfig keyword arguments, typed like the field's default; an unknown key, a
    malformed pair or a bad value stops the script before anything runs, naming the key."""
    defaults = AnalyticConfig()
    types = {f.name: str(f.type) for f in dataclasses.fields(AnalyticConfig)}
    fields = sorted(f for f, v in vars(defaults).items()
                    if isinstance(v, (bool, int, float, str, list)) and f not in ("device", "cache_dir"))
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            parser.error(f"--world {pair!r}: expected KEY=VALUE with KEY one of {fields}")
        kind = type(getattr(defaults, key))
        try:
            if kind is list:  # comma-separated, typed by the field's annotation (list[float] or list[str])
                item = float if types[key] == "list[float]" else str
                out[key] = [item(v) for v in value.strip("[]").split(",") if v.strip()]
            else:
                out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            parser.error(f"--world {pair!r}: {value!r} is not a {types[key]}")
    try:
        AnalyticConfig(**out)
    except ValueError as err:
        parser.error(f"--world: {err}")
    return out


def world_override(pair: str, world: dict) -> str:
    """The Hydra override of one ``--world KEY=VALUE`` (as typed; a list in brackets, since a bare ``a,b,c`` is a
    Hydra sweep)."""
    key = pair.partition("=")[0]
    value = world[key]
    if isinstance(value, list):
        return f"prior.{key}=[{','.join(f'{v:g}' if isinstance(v, float) else v for v in value)}]"
    return f"prior.{pair}"


def variant_section(kind: str, rows: dict, protocol: ExactProtocol, command: str, pending: str) -> str:
    if kind == "from_truth":
        title = "From the truth: what each method does to exact samples"
        intro = """The same protocol as the table above, except that every image starts at an exact
sample of its own prompt (`target.init=samples`; the first row is other exact draws: what keeping the truth scores):
a method whose fixed point is the data keeps them, one that over-saturates or over-smooths shows it
here without the time it takes to form a shape from randn."""
    elif kind == "learned":
        title = "The same world with a trained network as the prior (prior=learned)"
        intro = """The same protocol on the exact world with a small UNet *trained on its samples* in
place of the closed-form eps (`prior=learned`, sdbridge/priors/learned.py; 16 px, so exact samples score a lower FD
than at 32): the denoiser behaves as a network does off the data, while the true samples and every metric stay the
world's. The DDIM rows are the network's own samples."""
    else:
        title = "A variant of the world, side by side with the table"
        intro = """The same protocol as the table above on a variant of the exact world (the overrides below,
for every method run and for the reference rows, so each row is scored against this world's own truth): a world
change measured before it becomes the default."""
    return f"""## {title}

Regenerate with `{command}`. {intro} **Protocol.** {protocol.describe()}.

{markdown_table(rows)}
{pending}
FD per prompt:

{per_prompt_table(rows, 'fd')}

Images (one row per prompt: {', '.join(repr(p) for p in protocol.prompts)}; the first 8 of each):

{chr(10).join(f"**{name}**{chr(10)}{chr(10)}![{name}](grids/{kind}/{slug(name)}.png){chr(10)}" for name in rows)}
"""


if __name__ == "__main__":
    main()
