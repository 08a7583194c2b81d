"""FID and CLIP-FID through clean-fid, with a pluggable feature extractor.

Images are read and resized exactly as clean-fid does (its ``ResizeDataset``: PIL bicubic in float, "clean" mode;
CLIP features use clean-fid's CLIP preprocessing: bicubic resize of the short side to 224 then a center crop).
Real COCO images are not square while generated ones are, so references are first center-cropped to a square
(``crop=True``, the usual text-to-image FID practice); generated images are square and left as they are.

Extractors (``build_extractor(name)``):

* ``inception``: clean-fid's Inception-V3 (the TF-ported torchscript model, pool3 features, 2048-d). Its weights
  are downloaded by clean-fid on first use to ``/tmp/inception-2015-12-05.pt``.
* ``clip``: CLIP ViT-B/32 image embeddings (512-d, OpenAI weights through open_clip, the same network as clean-fid's
  ``clip_vit_b_32`` which needs the unpackaged ``clip`` module). Weights come from the Hugging Face hub.
* ``random_cnn``: a small fixed random-weight CNN (64-d) at 64x64: no download, for tests and offline smoke runs;
  its numbers are not comparable with published FIDs.
* ``"package.module:function"``: any callable returning a :class:`FeatureExtractor` (pluggable).

Reference statistics (mean and covariance of the real images' features) are computed once per (extractor, image
list, crop) and cached as ``.npz`` files.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

#: clean-fid's Inception weights location and source (cleanfid/downloads_helper.py)
INCEPTION_PATH = Path("/tmp/inception-2015-12-05.pt")
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
#: CLIP's image normalization (OpenAI CLIP, as in cleanfid/clip_features.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureExtractor(abc.ABC):
    """Maps a batch ``(N, 3, H, W)`` of float images in [0, 255] to features ``(N, D)``, on ``device``.

    ``resize`` takes one ``(H, W, 3)`` uint8 image and returns it at the network's input size (clean-fid's
    ``custom_fn_resize``); None means clean-fid's clean 299x299 resize.
    """

    name: str = "features"
    resize: Optional[Callable[[np.ndarray], np.ndarray]] = None
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of the batch."""


class InceptionFeatures(FeatureExtractor):
    name = "inception"

    def __init__(self, device: torch.device):
        if not INCEPTION_PATH.is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"FID: clean-fid's Inception weights are expected at {INCEPTION_PATH} (clean-fid "
                                    f"downloads them from {INCEPTION_URL}; this process is offline)")
        from cleanfid.features import build_feature_extractor

        self.device = device
        try:
            self.model = build_feature_extractor("clean", device, use_dataparallel=False)
        except Exception as err:  # network errors come in many types
            raise FileNotFoundError(f"FID: could not load clean-fid's Inception weights into {INCEPTION_PATH} from "
                                    f"{INCEPTION_URL}: {err}") from err

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)


def clip_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's ``img_preprocess_clip``: bicubic resize of the short side to 224, then a 224 center crop."""
    from PIL import Image
    from torchvision import transforms

    pil = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    pil = transforms.CenterCrop(224)(transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC)(pil))
    return np.asarray(pil).clip(0, 255).astype(np.uint8)


class ClipFeatures(FeatureExtractor):
    name = "clip_vit_b_32"
    resize = staticmethod(clip_resize)

    def __init__(self, device: torch.device):
        import open_clip

        try:
            model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai", device=device)
        except Exception as err:
            raise FileNotFoundError(f"CLIP-FID: CLIP ViT-B/32 weights (open_clip 'ViT-B-32', pretrained='openai') "
                                    f"could not be loaded from the Hugging Face hub or its cache: {err}") from err
        self.model = model.eval()
        self.device = device
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image((batch.to(self.device) / 255 - self.mean) / self.std).float()


class RandomCNNFeatures(FeatureExtractor):
    """A fixed random-weight CNN (seed 0, He init): 4 stride-2 conv + ReLU layers, global average and max pooling,
    64-d, at 64x64."""

    name = "random_cnn"

    def __init__(self, device: torch.device, size: int = 64):
        from cleanfid.resize import make_resizer

        self.resize = make_resizer("PIL", False, "bicubic", (size, size))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            channels = [3, 16, 32, 32, 32]
            for c_in, c_out in zip(channels, channels[1:]):
                conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # keeps the activations' scale
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU()]
            self.net = nn.Sequential(*layers).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        h = self.net(batch.to(self.device) / 127.5 - 1)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


EXTRACTORS: dict[str, Callable[[torch.device], FeatureExtractor]] = {
    "inception": InceptionFeatures,
    "clip": ClipFeatures,
    "random_cnn": RandomCNNFeatures,
}


def build_extractor(name: str, device: torch.device | str | None = None) -> FeatureExtractor:
    """An extractor by registry name or ``"module:function"``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name in EXTRACTORS:
        return EXTRACTORS[name](device)
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(device)
    raise ValueError(f"unknown feature extractor {name!r}; allowed: {sorted(EXTRACTORS)} or 'package.module:function'")


def center_crop(image: np.ndarray) -> np.ndarray:
    """The largest centered square of an ``(H, W, 3)`` image."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def image_features(files: Sequence[str | Path], extractor: FeatureExtractor, crop: bool = False,
                   batch_size: int = 32) -> np.ndarray:
    """Features ``(N, D)`` of image files, read and resized by clean-fid."""
    from cleanfid.fid import get_files_features

    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"FID: {len(missing)} image files are missing, e.g. {missing[0]}")
    return get_files_features(
        [str(f) for f in files], model=extractor, num_workers=0, batch_size=batch_size, device=extractor.device,
        mode="clean", custom_fn_resize=extractor.resize, custom_image_tranform=center_crop if crop else None,
        verbose=False,
    ).astype(np.float64)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features, as clean-fid's ``fid_from_feats``."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as S1 S2), which stays real and finite for the singular covariances of
    small image sets, where clean-fid's ``sqrtm`` can fail; for well-conditioned inputs both agree.
    """
    diff = mu1 - mu2
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def reference_statistics(files: Sequence[str | Path], extractor: FeatureExtractor, cache_dir: str | Path,
                         crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the real images' features, cached by (extractor, sorted file list, crop)."""
    names = sorted(str(Path(f).resolve()) for f in files)
    key = hashlib.sha1("\n".join([extractor.name, str(crop), *names]).encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(str(cache_dir))) / f"{extractor.name}-{len(names)}-{key}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["mu"], cached["sigma"]
    mu, sigma = statistics(image_features(names, extractor, crop=crop))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, num_images=len(names))
    return mu, sigma


def fid(files: Sequence[str | Path], reference: tuple[np.ndarray, np.ndarray], extractor: FeatureExtractor) -> float:
    """FID of generated image files against reference statistics."""
    return frechet_distance(*statistics(image_features(files, extractor)), *reference)
