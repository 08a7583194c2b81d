"""Prompt sets: which text each optimized sample is guided by, in which batches, on which shard.

Two sets share one interface (:class:`PromptSet`): a plain list (``prompt=default``: ``text``, ``texts`` or a
``file``) and COCO captions (``prompt=coco``: N captions picked deterministically from ``captions_val2014.json`` or
``captions_val2017.json``, one per image id, each keyed by its caption id). Both can be

* **sharded** (``prompt.shard=i prompt.num_shards=n``): shard i takes every n-th sample of the selection, so the n
  shards cover it exactly once whatever n is;
* **batched** (``prompt.batch_size=B``): a run optimizes its samples B at a time, one optimization per batch;
* **independent** (``prompt.seed_per_prompt=true``): each sample draws its randomness from its own generator
  seeded by (run seed, sample key) (sdbridge/rng.py), so its image is the same alone, in any batch, on any shard.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdbridge.registry import option


@option("prompt", "prompt")
@dataclass
class PromptConfig:
    """One prompt per optimized sample.

    The list is ``[text]`` if ``text`` is set, else the lines of ``file`` if set, else ``texts``; each entry is then
    repeated ``repeat`` times (``repeat`` independent samples per prompt). So ``prompt.text="a dolphin"`` on the
    command line replaces the default list.
    """

    text: Optional[str] = None
    texts: list[str] = field(default_factory=list)
    file: Optional[str] = None  # UTF-8 text file, one prompt per line; blank lines and lines starting with # skipped
    repeat: int = 1
    batch_size: Optional[int] = None  # optimize B samples at a time (null: all of the run's samples at once)
    seed_per_prompt: bool = False  # each sample's randomness from its own generator: results independent of batching
    shard: int = 0  # this run's shard of the selection ...
    num_shards: int = 1  # ... out of num_shards (shard i takes samples i, i + n, i + 2n, ...)

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"prompt.repeat={self.repeat} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"prompt.batch_size={self.batch_size} must be >= 1 (or null: all samples at once)")
        if self.num_shards < 1:
            raise ValueError(f"prompt.num_shards={self.num_shards} must be >= 1")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"prompt.shard={self.shard} must be in [0, prompt.num_shards={self.num_shards})")


#: where ``prompt=coco`` looks for the captions file under ``root``, in this order
COCO_ANNOTATIONS = (
    "annotations/captions_val2014.json",
    "captions_val2014.json",
    "annotations/captions_val2017.json",
    "captions_val2017.json",
)


@option("prompt", "coco")
@dataclass
class CocoPromptConfig(PromptConfig):
    """COCO captions (``prompt=coco``): ``num`` captions, one per image id, picked from ``select_seed``.

    Selection: the image ids that have captions, sorted, shuffled by ``random.Random(select_seed)``; the first
    ``num`` are kept and each gets one of its captions (sorted by caption id) chosen by the same RNG; the result is
    ordered by caption id. The same seed and file always give the same captions.
    """

    root: str = "data/coco"  # the COCO folder (conf/prompt/coco.yaml reads $COCO_ROOT)
    annotations: Optional[str] = None  # captions JSON, relative to root; default: the first of COCO_ANNOTATIONS found
    images: Optional[str] = None  # folder of the real images, relative to root; default: val2014/ or val2017/
    num: int = 5000
    select_seed: int = 0
    require_images: bool = True  # check at start that every selected real image exists (FID needs them)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num < 1:
            raise ValueError(f"prompt.num={self.num} must be >= 1")


@dataclass
class PromptSet:
    """The samples of one run: ``texts[i]`` guides sample i, whose stable key is ``keys[i]``.

    ``records[i]`` describes sample i for summaries (key, prompt, and for COCO the caption and image ids and the
    real image's path). ``selection_size`` is the size of the whole selection before sharding.
    """

    texts: list[str]
    keys: list[str]
    records: list[dict[str, Any]]
    selection_size: int
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: Optional[int]) -> list["PromptSet"]:
        """Consecutive batches of ``batch_size`` samples (one batch of all when None)."""
        if batch_size is None or batch_size >= len(self):
            return [self]
        return [
            PromptSet(self.texts[i : i + batch_size], self.keys[i : i + batch_size],
                      self.records[i : i + batch_size], self.selection_size, self.description)
            for i in range(0, len(self), batch_size)
        ]


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    """Indices of shard ``shard`` of ``num_shards`` over n items: every num_shards-th from ``shard``."""
    return list(range(shard, n, num_shards))


def _plain_texts(config: PromptConfig) -> list[str]:
    if config.text is not None:
        base = [config.text]
    elif config.file:
        path = Path(os.path.expanduser(config.file))
        if not path.is_file():
            raise FileNotFoundError(f"prompt.file={config.file!r}: no such file (expected one prompt per line)")
        try:
            base = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt.file={config.file!r}: {path} is not UTF-8 text (byte {err.start} cannot be "
                             "decoded); save it as UTF-8 text, one prompt per line") from None
        base = [ln for ln in base if ln and not ln.startswith("#")]
        if not base:
            raise ValueError(f"prompt.file={config.file!r} holds no prompts (one prompt per line expected)")
    else:
        base = [str(t) for t in config.texts]
    if not base:
        raise ValueError("the prompt list is empty: set prompt.text, prompt.texts=[...] or prompt.file=<path>")
    return [p for p in base for _ in range(config.repeat)]


def coco_paths(config: CocoPromptConfig) -> tuple[Path, Path]:
    """``(captions JSON, real-image folder)``; a missing file or folder raises with the paths that were expected."""
    root = Path(os.path.expanduser(config.root))
    if config.annotations:
        annotations = root / config.annotations
        if not annotations.is_file():
            raise FileNotFoundError(f"prompt=coco: captions file {annotations} not found (prompt.annotations="
                                    f"{config.annotations!r} under prompt.root={str(root)!r})")
    else:
        found = [root / rel for rel in COCO_ANNOTATIONS if (root / rel).is_file()]
        if not found:
            tried = ", ".join(str(root / rel) for rel in COCO_ANNOTATIONS)
            raise FileNotFoundError(
                f"prompt=coco: no COCO captions file under prompt.root={str(root)!r}; expected one of: {tried}. "
                "Set prompt.root (or $COCO_ROOT) to the folder holding annotations/captions_val2014.json and val2014/"
            )
        annotations = found[0]
    if config.images:
        images = root / config.images
    else:
        year = "2017" if "2017" in annotations.name else "2014"
        images = root / f"val{year}"
    return annotations, images


def select_coco(config: CocoPromptConfig) -> tuple[list[dict[str, Any]], Path, Path]:
    """The whole selection (before sharding): ``num`` records ``{key, prompt, caption_id, image_id, image}``, with
    the captions file and the real-image folder they came from."""
    annotations, images_dir = coco_paths(config)
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        by_image: dict[int, list[tuple[int, str]]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), " ".join(str(ann["caption"]).split())))
    except (ValueError, KeyError, TypeError) as err:  # ValueError: invalid JSON, or bytes that are not UTF-8
        raise ValueError(f"prompt=coco: {annotations} is not a COCO captions file ({type(err).__name__}: {err}); "
                         "expected {'images': [{'id', 'file_name'}], 'annotations': [{'id', 'image_id', 'caption'}]}")
    ids = sorted(i for i in by_image if i in files)
    if len(ids) < config.num:
        raise ValueError(f"prompt.num={config.num} but {annotations} has captions for only {len(ids)} images")
    rng = random.Random(config.select_seed)
    rng.shuffle(ids)
    records = []
    for image_id in ids[: config.num]:
        caption_id, caption = rng.choice(sorted(by_image[image_id]))
        records.append({"key": str(caption_id), "prompt": caption, "caption_id": caption_id, "image_id": image_id,
                        "image": str(images_dir / files[image_id])})
    records.sort(key=lambda r: r["caption_id"])
    if config.require_images:
        if not images_dir.is_dir():
            raise FileNotFoundError(f"prompt=coco: real-image folder {images_dir} not found (FID needs the images of "
                                    "the selected ids; set prompt.images, or prompt.require_images=false to only "
                                    "generate)")
        missing = [r["image"] for r in records if not Path(r["image"]).is_file()]
        if missing:
            raise FileNotFoundError(f"prompt=coco: {len(missing)} selected real images are missing from {images_dir}, "
                                    f"e.g. {missing[0]}")
    return records, annotations, images_dir


def load_prompt_set(config: PromptConfig) -> PromptSet:
    """The run's samples: the selection, then this run's shard of it."""
    if isinstance(config, CocoPromptConfig):
        records, annotations, images = select_coco(config)
        description = {"set": "coco", "annotations": str(annotations), "images": str(images), "num": config.num,
                       "select_seed": config.select_seed}
    else:
        texts = _plain_texts(config)
        records = [{"key": f"{i:05d}", "prompt": p} for i, p in enumerate(texts)]
        description = {"set": "list", "prompts": sorted(set(texts)), "num": len(texts)}
    keep = shard_indices(len(records), config.shard, config.num_shards)
    if not keep:
        raise ValueError(f"prompt.shard={config.shard} of prompt.num_shards={config.num_shards} is empty: the "
                         f"selection has only {len(records)} samples")
    mine = [records[i] for i in keep]
    description.update(shard=config.shard, num_shards=config.num_shards)
    return PromptSet([r["prompt"] for r in mine], [r["key"] for r in mine], mine, len(records), description)
