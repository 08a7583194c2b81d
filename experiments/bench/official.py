"""Side by side with the official loops: ms per training step of an official-style loop and of sdbridge's own loop.

For one method, one side per process:

* ``--side official``: the official code's loop, re-derived on plain diffusers in ``tests/parity/official/`` (the
  modules whose gradients the parity tests check against sdbridge's), with the official per-step work: its t and
  noise draws, its text-feature caching (and re-encoding), its UNet calls with autograd or under ``no_grad`` as the
  official code makes them, its loss trick and optimizer, its VAE decode + PNG every ``--save-every`` steps;
* ``--side sdbridge``: ``sdbridge.runner.run``, the path of ``python run.py``, with the method's default config
  (``conf/guidance/<method>.yaml``) plus what makes the two runs comparable: the same prior, dtype and device, batch
  1 (one prompt), seed, number of steps, image saving every ``--save-every`` steps (``trainer.save_every``) and no
  checkpoints during the run (the official loops write none).

Each side times every step (start of a step to the start of the next, CUDA-synchronized) and counts its UNet calls
and the latents they see (every UNet's ``forward`` is wrapped: VSD's LoRA UNet and its training pass included). It
prints the median ms per step of the timed steps and writes them with the per-step counts to ``--json``.
``--match SDBRIDGE.json`` on the official side replays sdbridge's timesteps where a method's work depends on t
(ISM's inversion length) and checks equal work: per step, the official UNet calls and latents minus the work its code
does that sdbridge by design does not (:data:`EXTRA_WORK`) must equal sdbridge's.

``--all`` runs every method ``--repeats`` times, official and sdbridge alternately (sdbridge first in even
repetitions, official first in odd ones), in one process that builds the model once and hands its modules to both
sides (``--spawn``: every run in a fresh process instead), checks equal work for every pair and prints (``--readme``:
writes into experiments/bench/README.md, after every repetition) the table of median ms per step, the ratio
sdbridge / official and its spread over the repetitions.

    python experiments/bench/official.py --method sds --side sdbridge --steps 200 --warmup 5 --json ours.json
    python experiments/bench/official.py --method sds --side official --steps 200 --warmup 5 --json off.json \
        --match ours.json
    python experiments/bench/official.py --all --repeats 5 --readme                # every method, tiny SD
    python experiments/bench/official.py --all --prior sd21_base_random --latent-size 16 --steps 30 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python experiments/bench/official.py`: the repository's packages (tests.parity)
    sys.path.insert(0, str(ROOT))

from experiments.bench.readme import README_PATH_OPTION  # noqa: E402

PROMPT = "a DSLR photo of a dolphin"  # the SDS-Bridge 2D code's default prompt, both sides, every method
PRIORS = ("tiny_sd", "sd21_base_random")
SIDES = ("official", "sdbridge")


@dataclass(frozen=True)
class Method:
    """A method of the table: sdbridge's overrides (on top of its default config) and the official loop."""

    overrides: tuple[str, ...]
    official: str


METHODS: dict[str, Method] = {
    "sds": Method(("guidance=sds",), "SDS-Bridge `generate.py --mode sds`"),
    "bridge1": Method(("guidance=bridge",), "SDS-Bridge `generate.py --mode bridge` before step 500 (`sds_loss`)"),
    "bridge2": Method(("guidance=bridge", "guidance.stage_two_start_step=0"),
                      "SDS-Bridge `generate.py --mode bridge --stage_two_start_step 0` (`bridge_stage_two`)"),
    "nfsd": Method(("guidance=nfsd",), "SDS-Bridge `generate.py --mode nfsd`"),
    "vsd": Method(("guidance=vsd",), "SDS-Bridge `generate.py --mode vsd` (LoRA on a second UNet)"),
    "sdi": Method(("guidance=sdi",), "threestudio SDI guidance called every step (the notebook's loop)"),
    "ism": Method(("guidance=ism",), "LucidDreamer `train_step` with train.py's iteration on a latent"),
}

#: method -> (why, UNet calls, latents) per step that the official code evaluates and sdbridge by design does not
EXTRA_WORK: dict[str, str] = {
    "nfsd": "two calls of 2 latents, the second's unconditional half evaluated again and discarded "
            "(sdbridge: one call of 3)",
    "vsd": "the LoRA evaluated on [x_t, x_t] with two zero cameras (sdbridge: once; the LoRA's CFG scale is 1)",
    "ism": "at s = 1 (ind_t <= delta_t) the UNet evaluated at timestep 1 twice (sdbridge: once)",
}


def official_extra(method: str, info: dict[str, Any]) -> tuple[int, int]:
    """The official step's UNet calls and latents beyond sdbridge's (:data:`EXTRA_WORK`), for batch 1."""
    if method == "nfsd":
        return 1, 1
    if method == "vsd":
        return 0, 1
    if method == "ism" and info["ind_prev_t"] == 0:
        return 1, 1
    return 0, 0


# ---------------------------------------------------------------- counting and timing
class UNetCounter:
    """Counts calls of the wrapped UNets' ``forward`` and the latents they see (the sample's batch size). A UNet
    wrapped again (a model shared by the runs of one process) counts for the counter that wrapped it last."""

    def __init__(self):
        self.calls = 0
        self.rows = 0

    def wrap(self, unet) -> None:
        unet._bench_counter = self
        if getattr(unet, "_bench_wrapped", False):
            return
        forward = unet.forward

        def counted(*args, **kwargs):
            sample = args[0] if args else kwargs["sample"]
            counter = unet._bench_counter
            counter.calls += 1
            counter.rows += int(sample.shape[0])
            return forward(*args, **kwargs)

        unet.forward = counted  # an instance attribute: both unet(...) and unet.forward(...) go through it
        unet._bench_wrapped = True


class StepClock:
    """Marks at the start of every step (after a device sync): per-step durations and UNet counts."""

    def __init__(self, counter: UNetCounter, sync: Callable[[], None], profile: tuple[int, int] | None = None):
        self.counter, self.sync = counter, sync
        self.marks: list[tuple[float, int, int]] = []
        self.profile = profile  # cProfile from the mark of this index to the mark of that one
        self.profiler = None

    def mark(self) -> None:
        self.sync()
        if self.profile is not None and len(self.marks) == self.profile[1] and self.profiler is not None:
            self.profiler.disable()
        self.marks.append((time.perf_counter(), self.counter.calls, self.counter.rows))
        if self.profile is not None and len(self.marks) == self.profile[0] + 1:
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def steps(self, n: int) -> dict[str, list]:
        """The first ``n`` steps between consecutive marks: ms, UNet calls, latents."""
        pairs = list(zip(self.marks[:-1], self.marks[1:]))[:n]
        return {"ms": [1000 * (b[0] - a[0]) for a, b in pairs], "calls": [b[1] - a[1] for a, b in pairs],
                "rows": [b[2] - a[2] for a, b in pairs]}


def _sync(device) -> Callable[[], None]:
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---------------------------------------------------------------- the official side
def official_model(args, device, dtype, prior=None):
    """The model as the official codes load it, and (a callable) VSD's LoRA base: diffusers folders for the tiny SD
    (the ones sdbridge builds offline and loads), prebuilt modules for the random-weight SD 2.1 base (the same seeds).
    With ``prior`` (the model one process shares between its runs), that prior's own modules."""
    from sdbridge.priors.random_sd import (SD21_BASE_SCHEDULER, RandomSDConfig, build_random_sd21_base,
                                           build_random_sd21_companion_unet)

    if args.prior == "tiny_sd":
        from sdbridge.priors.tiny import TinySDConfig, ensure_tiny_sd, stand_in_folder
        from tests.parity.official.sds_bridge_2d import OFFICIAL_LORA_MODEL

        tiny = TinySDConfig(**({"cache_dir": args.cache_dir} if args.cache_dir else {}),
                            **({"latent_size": args.latent_size} if args.latent_size else {}))
        lora = lambda: stand_in_folder(tiny, OFFICIAL_LORA_MODEL)  # noqa: E731
    else:
        random_sd = RandomSDConfig(**({"latent_size": args.latent_size} if args.latent_size else {}))
        lora = lambda: {"unet": build_random_sd21_companion_unet(device, dtype, random_sd.seed),  # noqa: E731
                        "scheduler_config": {"prediction_type": "v_prediction"}}
    if prior is not None:
        from diffusers import DDIMScheduler

        scheduler = (DDIMScheduler.load_config(prior.model_path, subfolder="scheduler") if prior.model_path
                     else SD21_BASE_SCHEDULER)
        return {"tokenizer": prior.tokenizer, "text_encoder": prior.text_encoder, "unet": prior.unet,
                "vae": prior.vae, "scheduler_config": dict(scheduler)}, lora
    if args.prior == "tiny_sd":
        return ensure_tiny_sd(tiny), lora
    return build_random_sd21_base(device, dtype, random_sd.seed, random_sd.latent_size), lora


def official_loop(args, device, dtype, counter: UNetCounter, save_dir: Path, plan: list[int] | None, prior=None):
    """The method's official loop after its setup: ``step(i) -> {"t", ...}``."""
    import numpy as np
    import torch

    method = args.method
    base, lora = official_model(args, device, dtype, prior)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    if method in ("sds", "bridge1", "bridge2", "nfsd", "vsd"):
        from tests.parity.official.sds_bridge_2d import GenerateArgs, GenerateLoop, Official2D, OfficialVSD

        if dtype != torch.float32:
            raise SystemExit(f"{method}: the SDS-Bridge 2D code runs its UNet in float32 (no casts); use --dtype "
                             f"float32 (half precision: {', '.join(HALF_PRECISION_METHODS)})")
        g = OfficialVSD(base, lora(), device) if method == "vsd" else Official2D(base, device)
        for unet in (g.unet, getattr(g, "unet_lora", None)):
            if unet is not None:
                counter.wrap(unet)
        size = g.unet.config.sample_size
        im = torch.randn((1, 4, size, size), device=device)  # generate.py: randn((1, 4, 64, 64))
        mode = {"bridge1": "bridge", "bridge2": "bridge"}.get(method, method)
        loop = GenerateLoop(g, GenerateArgs(prompt=PROMPT, mode=mode, stage_two_start_step=0 if method == "bridge2"
                                            else GenerateArgs.stage_two_start_step),
                            im, save_every=args.save_every, save_dir=save_dir)
        return lambda i: {"t": int(loop.step(i)["t"].reshape(-1)[0])}
    if method == "sdi":
        from tests.parity.official.threestudio_sdi import NotebookLoop, OfficialSDI

        g = OfficialSDI(base, device, weights_dtype=dtype, trainer_max_steps=total_steps(args))
        counter.wrap(g.unet)
        size = g.unet.config.sample_size
        loop = NotebookLoop(g, PROMPT, torch.randn(1, 4, size, size), args.save_every, save_dir)
        return lambda i: {"t": int(loop.step(i)["t"][0])}
    if method == "ism":
        from tests.parity.official.luciddreamer_ism import LatentLoop, OfficialISM
        from tests.parity.official.sds_bridge_2d import IM_ADAMW

        g = OfficialISM(base, device, precision_t=dtype, noise_seed=args.seed)
        counter.wrap(g.unet)
        size = g.unet.config.sample_size
        # LucidDreamer optimizes Gaussians; the latent gets the Bridge 2D code's AdamW, sdbridge's default here too
        loop = LatentLoop(g, PROMPT, torch.randn(1, 4, size, size), optimizer=IM_ADAMW,
                          save_every=args.save_every, save_dir=save_dir)

        def step(i: int) -> dict:
            last = loop.step(i, None if plan is None else plan[i] - 1)  # official index i = timestep i + 1
            return {"t": last["t"], "ind_prev_t": last["ind_prev_t"]}

        return step
    raise SystemExit(f"unknown method {method!r}")


def run_official(args, plan: list[int] | None = None, prior=None) -> dict:
    """The official side. A shared ``prior``'s modules run diffusers' stock attention forward here, as the official
    codes load them (sdbridge's prior routes its attention layers to their processors directly)."""
    from sdbridge.priors.stable_diffusion import direct_attention

    shared = [] if prior is None else [prior.unet, prior.vae]
    for module in shared:
        direct_attention(module, on=False)
    try:
        return _run_official(args, plan, prior)
    finally:
        for module in shared:
            direct_attention(module)


def _run_official(args, plan: list[int] | None, prior) -> dict:
    import torch
    from tqdm import tqdm

    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    counter = UNetCounter()
    with tempfile.TemporaryDirectory() as tmp:
        step = official_loop(args, device, dtype, counter, Path(tmp), plan, prior)
        clock = StepClock(counter, _sync(device), profile_window(args))
        infos = []
        for i in tqdm(range(total_steps(args))):  # every official loop iterates under a tqdm progress bar
            clock.mark()
            infos.append(step(i))
        clock.mark()
    extra = [official_extra(args.method, info) for info in infos[:total_steps(args) - 1]]
    return {**clock.steps(total_steps(args) - 1), "t": [info["t"] for info in infos], "extra_calls": [e[0] for e in extra],
            "extra_rows": [e[1] for e in extra], "_profiler": clock.profiler}


# ---------------------------------------------------------------- the sdbridge side
def prior_overrides(args, device) -> list[str]:
    overrides = [f"prior={args.prior}", f"prior.device={device.type}", f"prior.dtype={args.dtype}"]
    if args.latent_size:
        overrides.append(f"prior.latent_size={args.latent_size}")
    if args.cache_dir and args.prior == "tiny_sd":
        overrides.append(f"prior.cache_dir={args.cache_dir}")
    return overrides


def sdbridge_overrides(args, device) -> list[str]:
    return [*prior_overrides(args, device), *METHODS[args.method].overrides, f"prompt.texts=[{PROMPT}]",
            "prompt.repeat=1", f"seed={args.seed}", f"trainer.max_steps={total_steps(args)}",
            f"trainer.save_every={args.save_every}", "trainer.checkpoint_every=0"]


def build_shared_prior(args):
    """The prior one process builds once for all its runs (``--all`` without ``--spawn``)."""
    from sdbridge.eval.protocol import compose_run_config
    from sdbridge.priors import build_prior

    config, _ = compose_run_config(prior_overrides(args, resolve_device(args.device)))
    return build_prior(config.prior)


def run_sdbridge(args, prior=None) -> dict:
    import lightning as L

    from sdbridge.eval.protocol import compose_run_config
    from sdbridge.runner import run

    device = resolve_device(args.device)
    counter = UNetCounter()
    clock = StepClock(counter, _sync(device), profile_window(args))
    t_record: list[int] = []

    class Observer(L.Callback):
        """Wraps the UNets (the prior's and VSD's LoRA base) and the t draws; marks every step's start."""

        def on_fit_start(self, trainer, pl_module) -> None:
            counter.wrap(pl_module.prior.unet)
            source = getattr(pl_module.guidance, "source", None)
            if getattr(source, "model", None) is not None:
                counter.wrap(source.model.unet)
            guidance = pl_module.guidance
            sample = guidance.sample_timesteps

            def recorded(step: int, batch_size: int):
                t = sample(step, batch_size)
                t_record.append(int(t.reshape(-1)[0]))
                return t

            guidance.sample_timesteps = recorded

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.mark()

    config, _ = compose_run_config(sdbridge_overrides(args, device))
    with tempfile.TemporaryDirectory() as tmp:
        run(config, Path(tmp), callbacks=[Observer()], prior=prior)
    if len(t_record) != total_steps(args):
        raise RuntimeError(f"recorded {len(t_record)} timesteps for {total_steps(args)} steps")
    return {**clock.steps(total_steps(args) - 1), "t": t_record, "_profiler": clock.profiler}


# ---------------------------------------------------------------- one side
def total_steps(args) -> int:
    """Steps run: warm-up + timed + 1 (each timed step is measured up to the start of the next one)."""
    return args.warmup + args.steps + 1


def profile_window(args) -> tuple[int, int] | None:
    """``--profile``: from the start of the first timed step to the start of the step after the last."""
    return (args.warmup, args.warmup + args.steps) if args.profile else None


def environment(args) -> dict[str, Any]:
    import platform

    import torch

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "prior": args.prior, "latent_size": args.latent_size,
            "dtype": args.dtype, "seed": args.seed, "steps": args.steps, "warmup": args.warmup,
            "save_every": args.save_every, "stub_unet": args.stub_unet}


def run_side(args, match: dict | None = None, prior=None) -> dict:
    """Run one side; returns its record (``ms``, ``calls``, ``rows`` of every step but the last, ``t``, medians).
    ``match``: sdbridge's record for the official side (its t, the equal-work check); ``prior``: a model shared by
    the runs of this process (both sides use its modules)."""
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_side(args, match, prior)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the tests) keep theirs


def _run_side(args, match: dict | None, prior) -> dict:
    if match is not None and match["side"] != "sdbridge":
        raise SystemExit(f"the official side matches an sdbridge record, not a {match['side']!r} one")
    if args.side == "official":
        plan = match["t"] if match is not None and args.method == "ism" else None
        rec = run_official(args, plan, prior)
    else:
        rec = run_sdbridge(args, prior)
    profiler = rec.pop("_profiler")
    timed = rec["ms"][args.warmup:]
    rec.update(method=args.method, side=args.side, **environment(args),
               median_ms=statistics.median(timed), mean_ms=statistics.fmean(timed),
               calls_per_step=statistics.fmean(rec["calls"][args.warmup:]),
               rows_per_step=statistics.fmean(rec["rows"][args.warmup:]))
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return rec


def equal_work(official: dict, ours: dict) -> list[str]:
    """Per timed step: the official calls and latents minus :data:`EXTRA_WORK` equal sdbridge's; the same t where t
    sets the work (SDI's deterministic anneal, ISM's replayed draws); the same protocol."""
    problems = [f"{key}: official {official[key]!r}, sdbridge {ours[key]!r}"
                for key in ("method", "prior", "latent_size", "dtype", "seed", "steps", "warmup", "save_every")
                if official[key] != ours[key]]
    if problems:
        return problems
    w = official["warmup"]
    for i in range(w, len(official["calls"])):
        off = (official["calls"][i] - official["extra_calls"][i], official["rows"][i] - official["extra_rows"][i])
        mine = (ours["calls"][i], ours["rows"][i])
        if off != mine:
            problems.append(f"step {i}: official {official['calls'][i]} calls / {official['rows'][i]} latents "
                            f"(- extra {official['extra_calls'][i]} / {official['extra_rows'][i]}), sdbridge "
                            f"{mine[0]} / {mine[1]}")
    if official["method"] in ("sdi", "ism") and official["t"] != ours["t"]:
        first = next(i for i, (a, b) in enumerate(zip(official["t"], ours["t"])) if a != b)
        problems.append(f"t differs from step {first}: official {official['t'][first]}, sdbridge {ours['t'][first]}")
    return problems


def work_line(official: dict, ours: dict, problems: list[str]) -> str:
    w = official["warmup"]
    extra = statistics.fmean(official["extra_calls"][w:]), statistics.fmean(official["extra_rows"][w:])
    why = f"; official extra by design {extra[0]:.2f} calls / {extra[1]:.2f} latents: {EXTRA_WORK[official['method']]}" \
        if official["method"] in EXTRA_WORK else ""
    return (f"UNet per step: official {official['calls_per_step']:.2f} calls / {official['rows_per_step']:.2f} latents, "
            f"sdbridge {ours['calls_per_step']:.2f} / {ours['rows_per_step']:.2f}{why}; equal work: "
            + ("OK" if not problems else f"NO ({len(problems)} problems)"))


# ---------------------------------------------------------------- all methods, interleaved
#: the methods whose official code runs its UNet in half precision (threestudio's and LucidDreamer's casts)
HALF_PRECISION_METHODS = ("sdi", "ism")


def run_all(args, argv: list[str]) -> int:
    """Every method, both sides alternately, ``--repeats`` times; the table goes to the terminal, ``--json`` and
    (``--readme``) the README after every repetition, so an interrupted run keeps the repetitions it finished."""
    methods = args.methods or (list(METHODS) if args.dtype == "float32" else list(HALF_PRECISION_METHODS))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_official_"))
    work.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in SIDES} for m in methods}
    prior = None if args.spawn else build_shared_prior(args)
    start = time.perf_counter()
    for rep in range(args.repeats):
        for method in methods:
            for side in (("sdbridge", "official") if rep % 2 == 0 else ("official", "sdbridge")):
                match = records[method]["sdbridge"][0] if side == "official" else None  # rep 0 runs sdbridge first
                one = argparse.Namespace(**{**vars(args), "method": method, "side": side, "all": False})
                rec = spawn_side(one, work, rep, match) if args.spawn else run_side(one, match, prior)
                records[method][side].append(rec)
                print(f"rep {rep + 1}/{args.repeats} {method:8s} {side:8s} {rec['median_ms']:9.2f} ms/step "
                      f"(mean {rec['mean_ms']:.2f}), UNet {rec['calls_per_step']:.2f} calls / "
                      f"{rec['rows_per_step']:.2f} latents per step", flush=True)
                release_memory()
            official, ours = records[method]["official"][-1], records[method]["sdbridge"][-1]
            problems = equal_work(official, ours)
            print("    " + work_line(official, ours, problems), flush=True)
            if problems:
                raise SystemExit(f"{method}: unequal work: " + "; ".join(problems[:5]))
        write_results(args, argv, records)
    print(f"\n(official bench: {time.perf_counter() - start:.0f} s; per-run records in {work})", file=sys.stderr)
    return 0


def spawn_side(args, work: Path, rep: int, match: dict | None) -> dict:
    """One side in a fresh process (``--spawn``); its output goes to ``work/runs.log``."""
    out = work / f"{args.method}-{args.side}-{rep}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--method", args.method, "--side", args.side, "--json",
           str(out)]
    for flag in ("prior", "latent_size", "steps", "warmup", "save_every", "seed", "device", "dtype", "threads",
                 "cache_dir"):
        value = getattr(args, flag)
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    if args.stub_unet:
        cmd.append("--stub-unet")
    if match is not None:
        matched = work / f"{args.method}-sdbridge-match.json"
        matched.write_text(json.dumps(match))
        cmd += ["--match", str(matched)]
    with (work / "runs.log").open("a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=log, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {work / 'runs.log'}")
    return json.loads(out.read_text())


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_results(args, argv: list[str], records: dict[str, dict[str, list[dict]]]) -> None:
    from experiments.bench.readme import block_key, command_line, write_block

    rows = summarize(records)
    first = next(iter(records.values()))["sdbridge"][0]
    text = table_text(rows, command_line("experiments/bench/official.py", argv), first, spawned=args.spawn)
    print("\n" + text + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "records": records}, indent=1))
    if args.readme:
        key = block_key(resolve_device(args.device).type, args.prior, args.latent_size, args.quick)
        write_block(args.readme_path, f"bench:official-{key}", text)


def summarize(records: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """Per method: the median over repetitions of each side's median ms per step, their ratio, and the spread of
    the per-repetition ratio; and the same for the mean over the timed steps (``mean_ratio``: the ratio of the
    timed steps' total time, which a step-dependent cost cannot shift: SDI's annealed t and ISM's t change a
    step's work, so where a decode step falls among them moves the median, not the total)."""
    rows = []
    for method, sides in records.items():
        official = [r["median_ms"] for r in sides["official"]]
        ours = [r["median_ms"] for r in sides["sdbridge"]]
        ratios = [b / a for a, b in zip(official, ours)]
        mean_ratios = [b["mean_ms"] / a["mean_ms"] for a, b in zip(sides["official"], sides["sdbridge"])]
        rows.append({"method": method, "official_ms": statistics.median(official), "sdbridge_ms": statistics.median(ours),
                     "ratio": statistics.median(ours) / statistics.median(official), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "mean_ratio": statistics.median(mean_ratios),
                     "mean_ratio_min": min(mean_ratios), "mean_ratio_max": max(mean_ratios), "repeats": len(ratios),
                     "official_calls": sides["official"][0]["calls_per_step"],
                     "sdbridge_calls": sides["sdbridge"][0]["calls_per_step"],
                     "official_rows": sides["official"][0]["rows_per_step"],
                     "sdbridge_rows": sides["sdbridge"][0]["rows_per_step"]})
    return rows


def table_text(rows: list[dict], command: str, env: dict, spawned: bool = False) -> str:
    lines = [f"`{command}`", "",
             f"Device: {env['device']}; torch {env['torch']}; prior `{env['prior']}`"
             + (f" (latents {env['latent_size']}x{env['latent_size']})" if env.get("latent_size") else "")
             + f", {env['dtype']}" + ("; the UNet a zero-cost stub (sample * 0.5): framework cost only"
                                      if env.get("stub_unet") else "") + f"; batch 1; median of {env['steps']} steps after {env['warmup']} warm-up steps, a decode "
             f"+ PNG every {env['save_every']} steps on both sides; {rows[0]['repeats'] if rows else 0} interleaved "
             "repetitions, " + ("each run a fresh process." if spawned else "all runs in one process sharing the "
                                "model."), "",
             "| method | official ms / step (median) | sdbridge ms / step (median) | sdbridge / official "
             "| spread (min–max) | ratio of mean step times (min–max) "
             "| UNet calls (latents) / step: official, sdbridge |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['official_ms']:,.2f} | {r['sdbridge_ms']:,.2f} | {r['ratio']:.2f} "
                     f"| {r['ratio_min']:.2f}–{r['ratio_max']:.2f} "
                     f"| {r['mean_ratio']:.2f} ({r['mean_ratio_min']:.2f}–{r['mean_ratio_max']:.2f}) "
                     f"| {r['official_calls']:.2f} "
                     f"({r['official_rows']:.2f}), {r['sdbridge_calls']:.2f} ({r['sdbridge_rows']:.2f}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--all", action="store_true", help="every method (or --methods), both sides, interleaved")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=None, help="with --all")
    parser.add_argument("--repeats", type=int, default=3, help="with --all: interleaved repetitions")
    parser.add_argument("--spawn", action="store_true",
                        help="with --all: every run in a fresh process (default: one process, the model built once)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 timed steps after 1, a PNG every 2 steps, 1 repetition")
    parser.add_argument("--prior", choices=PRIORS, default="tiny_sd")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="latents n x n (tiny_sd: 8; sd21_base_random: 64; e.g. 16 on a CPU)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=10,
                        help="decode + PNG every k steps on both sides (the SDS-Bridge loop's 10; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="both sides (the SDS-Bridge 2D code runs float32 only: --all then times sdi and ism)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    parser.add_argument("--cache-dir", default=None, help="the tiny SD's cache folder (prior.cache_dir)")
    parser.add_argument("--json", default=None, help="write the record (--all: every record and the table rows)")
    parser.add_argument("--match", default=None, help="official side: sdbridge's record (its t; equal-work check)")
    parser.add_argument("--profile", default=None, help="cProfile the timed steps of this side into a .prof file")
    parser.add_argument("--readme", action="store_true", help="with --all: write the table into the README")
    parser.add_argument("--stub-unet", action="store_true",
                        help="replace every UNet's forward by sample * 0.5 (same shapes): the framework's own cost")
    parser.add_argument(README_PATH_OPTION, type=Path, default=Path(__file__).with_name("README.md"),
                        help="the README that --readme writes (a copy, for dry runs)")
    parser.add_argument("--work-dir", default=None, help="with --all: where the per-run records go")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.save_every, args.repeats = 3, 1, 2, 1
    if not args.all and (args.method is None or args.side is None):
        parser.error("give --method and --side (or --all)")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.save_every < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup and --save-every >= 0")
    if args.stub_unet and args.readme:
        parser.error("--stub-unet times the framework alone: its table is not the README's side by side")
    return args


def stub_unet() -> None:
    """Every ``UNet2DConditionModel`` of this process returns ``sample * 0.5`` (same shapes, no compute): what is left
    of a step is the loop's own cost, on both sides alike."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        return UNet2DConditionOutput(sample=sample * 0.5)

    UNet2DConditionModel.forward = forward


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.stub_unet:
        stub_unet()
    if args.all:
        return run_all(args, argv)
    if args.method == "bridge1" and total_steps(args) > 500:
        print("note: bridge1 runs past step 500, where both sides switch to stage two", file=sys.stderr)
    match = json.loads(Path(args.match).read_text()) if args.match else None
    rec = run_side(args, match)
    if args.json:
        Path(args.json).write_text(json.dumps(rec))
    if match is not None and args.side == "official":
        problems = equal_work(rec, match)
        print(work_line(rec, match, problems))
        if problems:
            raise SystemExit("unequal work: " + "; ".join(problems[:5]))
    print(f"{args.side} {args.method} on {rec['prior']} ({rec['device']}): {rec['median_ms']:.2f} ms/step median "
          f"(mean {rec['mean_ms']:.2f}) over {args.steps} steps after {args.warmup}; UNet {rec['calls_per_step']:.2f} "
          f"calls / {rec['rows_per_step']:.2f} latents per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
