"""COCO prompt selection, sharding, per-sample generators and the FID math."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdbridge import rng
from sdbridge.metrics import fid as fidlib
from sdbridge.prompts import CocoPromptConfig, PromptConfig, load_prompt_set, shard_indices

WORDS = ["a red circle", "a blue square", "a yellow triangle", "a green ring", "a red square", "a blue circle",
         "a green triangle", "a yellow circle", "a red ring", "a blue ring", "a green square", "a yellow square"]


def make_fake_coco(root: Path, num_images: int = 12, captions_per_image: int = 2, seed: int = 0) -> Path:
    """A mini COCO: ``annotations/captions_val2014.json`` + non-square JPEGs in ``val2014/``.

    Captions speak the exact prior's vocabulary so runs can use ``prior=analytic``.
    """
    g = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        pixels = (g.random((48, 64, 3)) * 255).astype(np.uint8)
        pixels[..., i % 3] = 40 + 15 * i  # images differ in color, so FIDs are not degenerate
        Image.fromarray(pixels).save(root / "val2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
        for j in range(captions_per_image):
            annotations.append({"id": 50000 + 10 * i + j, "image_id": image_id,
                                "caption": WORDS[(i + j) % len(WORDS)] + (" " if j else "")})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images,
                                                                           "annotations": annotations}))
    return root


@pytest.fixture
def fake_coco(tmp_path) -> Path:
    return make_fake_coco(tmp_path / "coco")


def test_coco_selection_is_deterministic_one_caption_per_image(fake_coco):
    a = load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=6, select_seed=3))
    b = load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=6, select_seed=3))
    c = load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=6, select_seed=4))
    assert a.records == b.records
    assert {r["image_id"] for r in a.records} != {r["image_id"] for r in c.records}
    assert len({r["image_id"] for r in a.records}) == 6  # one caption per image id
    assert [int(k) for k in a.keys] == sorted(int(k) for k in a.keys)  # ordered by caption id
    for r in a.records:
        assert Path(r["image"]).is_file() and r["key"] == str(r["caption_id"])
        assert r["prompt"] == r["prompt"].strip()  # whitespace normalized


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 7])
def test_shards_cover_every_caption_exactly_once(fake_coco, num_shards):
    whole = load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=10)).keys
    parts = [load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=10, shard=i, num_shards=num_shards)).keys
             for i in range(num_shards)]
    merged = [k for p in parts for k in p]
    assert sorted(merged) == sorted(whole) and len(merged) == len(set(merged)) == 10
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert shard_indices(5, 1, 2) == [1, 3]


def test_plain_prompts_shard_and_batch():
    config = PromptConfig(texts=["a red circle", "a blue square"], repeat=3, shard=1, num_shards=2)
    ps = load_prompt_set(config)
    assert ps.keys == ["00001", "00003", "00005"] and ps.selection_size == 6
    batches = ps.batches(2)
    assert [b.keys for b in batches] == [["00001", "00003"], ["00005"]]
    assert ps.batches(None) == [ps]


def test_missing_coco_files_name_what_was_expected_where(tmp_path, fake_coco):
    with pytest.raises(FileNotFoundError) as err:
        load_prompt_set(CocoPromptConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope" / "annotations" / "captions_val2014.json") in str(err.value)
    with pytest.raises(FileNotFoundError, match="captions_val2017.json"):
        load_prompt_set(CocoPromptConfig(root=str(fake_coco), annotations="captions_val2017.json"))
    victim = sorted((fake_coco / "val2014").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=12))
    # generation alone may go without the real images
    assert len(load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=12, require_images=False))) == 12
    with pytest.raises(ValueError, match="prompt.num=99"):
        load_prompt_set(CocoPromptConfig(root=str(fake_coco), num=99))
    with pytest.raises(ValueError, match="prompt.shard=2"):
        PromptConfig(texts=["a"], shard=2, num_shards=2)


def test_sample_generators_draw_each_row_from_its_own_seed():
    keys = ["11", "7", "42"]
    gens = rng.SampleGenerators(5, keys)
    batch = rng.randn((3, 2, 4), gens)
    t = rng.randint(100, 3, gens, shared=True)  # a "shared" draw is per sample with independent samples
    for i, k in enumerate(keys):
        alone = rng.SampleGenerators(5, [k])
        assert torch.equal(batch[i : i + 1], rng.randn((1, 2, 4), alone))
        assert torch.equal(t[i : i + 1], rng.randint(100, 1, alone, shared=True))
    state = gens.get_state()
    a = rng.rand(3, gens)
    gens.set_state(state)
    assert torch.equal(a, rng.rand(3, gens))
    # the plain generator path draws exactly what torch draws
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(rng.randn((2, 3), g1), torch.randn((2, 3), generator=g2))
    assert torch.equal(rng.randint(50, 4, g1, low=10), torch.randint(10, 50, (4,), generator=g2))
    shared = rng.randint(50, 4, g1, shared=True)
    assert shared.unique().numel() == 1


def test_frechet_distance_matches_clean_fid_and_the_gaussian_closed_form():
    from cleanfid.fid import frechet_distance as clean_fid_distance

    g = np.random.default_rng(0)
    a, b = g.normal(size=(800, 6)), g.normal(size=(700, 6)) * 1.5 + 0.3
    stats_a, stats_b = fidlib.statistics(a), fidlib.statistics(b)
    ours = fidlib.frechet_distance(*stats_a, *stats_b)
    assert ours == pytest.approx(clean_fid_distance(*stats_a, *stats_b), rel=1e-9)
    # diagonal covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2, s1, s2 = np.zeros(3), np.ones(3), np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(3 + 1 + 0 + 4)
    # singular covariances of a handful of images stay finite and symmetric
    x, y = g.normal(size=(4, 16)), g.normal(size=(4, 16))
    d_xy = fidlib.frechet_distance(*fidlib.statistics(x), *fidlib.statistics(y))
    d_yx = fidlib.frechet_distance(*fidlib.statistics(y), *fidlib.statistics(x))
    assert np.isfinite(d_xy) and d_xy == pytest.approx(d_yx, rel=1e-6)
    assert fidlib.frechet_distance(*fidlib.statistics(x), *fidlib.statistics(x)) == pytest.approx(0, abs=1e-5)


def test_reference_statistics_are_cached_and_crop_real_images(fake_coco, tmp_path, monkeypatch):
    files = sorted((fake_coco / "val2014").iterdir())[:5]
    extractor = fidlib.build_extractor("random_cnn", "cpu")
    mu, sigma = fidlib.reference_statistics(files, extractor, tmp_path / "cache")
    assert mu.shape == (64,) and sigma.shape == (64, 64) and len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setattr(fidlib, "image_features", lambda *a, **k: pytest.fail("recomputed cached statistics"))
    mu2, _ = fidlib.reference_statistics(files, extractor, tmp_path / "cache")
    assert np.array_equal(mu, mu2)
    monkeypatch.undo()
    cropped = fidlib.image_features(files[:1], extractor, crop=True)
    square = fake_coco / "square.png"
    Image.open(files[0]).convert("RGB").crop((8, 0, 56, 48)).save(square)  # the centered 48x48 square
    assert np.allclose(cropped, fidlib.image_features([square], extractor), atol=0.05)
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        fidlib.build_extractor("nope")


def test_clip_features_follow_clean_fids_clip_preprocessing(monkeypatch, fake_coco):
    """The CLIP-FID extractor on a random-weight ViT-B/32 (the real weights need the hub): 224 bicubic resize +
    center crop, CLIP normalization, 512-d embeddings."""
    import open_clip

    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda name, pretrained, device: (open_clip.create_model(name, device=device), None, None))
    extractor = fidlib.build_extractor("clip", "cpu")
    image = np.asarray(Image.open(sorted((fake_coco / "val2014").iterdir())[0]).convert("RGB"))
    assert fidlib.clip_resize(image).shape == (224, 224, 3)
    feats = fidlib.image_features(sorted((fake_coco / "val2014").iterdir())[:3], extractor, crop=True)
    assert feats.shape == (3, 512) and np.isfinite(feats).all()


def test_offline_inception_fails_with_the_expected_path(monkeypatch):
    if fidlib.INCEPTION_PATH.is_file():
        pytest.skip("clean-fid's Inception weights are present on this machine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=str(fidlib.INCEPTION_PATH)):
        fidlib.build_extractor("inception", "cpu")
