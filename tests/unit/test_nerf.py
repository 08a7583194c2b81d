"""NeRF building blocks against closed forms: compositing, ray-sphere bounds, cameras, hash encoding, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdbridge.targets.nerf.cameras import (
    CameraConfig,
    CameraStream,
    camera_rays,
    look_at,
    sample_cameras,
    spherical_position,
    turntable_cameras,
)
from sdbridge.views import view_direction
from sdbridge.targets.nerf.encoding import HashGrid, HashGridConfig
from sdbridge.targets.nerf.export import extract_mesh, read_ply, write_obj, write_ply
from sdbridge.targets.nerf.field import FieldConfig, NormalType, RadianceField
from sdbridge.targets.nerf.regularizers import RegularizerConfig, regularizer_losses, schedule_value
from sdbridge.targets.nerf.renderer import (
    RendererConfig,
    Shading,
    ShadingConfig,
    VolumeRenderer,
    composite_weights,
    interval_lengths,
    pick_shading,
    ray_sphere,
    sample_pdf,
    stratified,
    visible_samples,
)


# ------------------------------------------------------------------ compositing
def test_weights_of_a_constant_density_match_the_closed_form_for_any_samples():
    gen = torch.Generator().manual_seed(0)
    near, far = torch.tensor([0.5, 1.0, 0.2]), torch.tensor([2.5, 1.5, 3.0])
    for sigma in (0.1, 1.0, 7.0):
        t = stratified(near, far, 37, gen)
        w = composite_weights(torch.full_like(t, sigma), interval_lengths(t, near, far))
        expected = 1 - torch.exp(-sigma * (far - near))
        assert torch.allclose(w.sum(-1), expected, atol=1e-5)
        # and each weight is the probability of terminating in its interval: T(a) - T(b)
        edges = torch.cat([near[:, None], (t[:, 1:] + t[:, :-1]) / 2, far[:, None]], 1)
        trans = torch.exp(-sigma * (edges - near[:, None]))
        assert torch.allclose(w, trans[:, :-1] - trans[:, 1:], atol=1e-5)


def test_slab_opacity_converges_to_the_closed_form_and_weights_never_exceed_one():
    # a slab of density 3 between depths 1 and 1.4 on [0, 2]: opacity 1 - exp(-3 * 0.4)
    near, far = torch.zeros(1), torch.full((1,), 2.0)
    t = stratified(near, far, 4000, None)
    sigma = 3.0 * ((t > 1.0) & (t < 1.4)).float()
    w = composite_weights(sigma, interval_lengths(t, near, far))
    assert w.sum().item() == pytest.approx(1 - math.exp(-1.2), abs=2e-3)
    random_sigma = torch.rand(64, 50, generator=torch.Generator().manual_seed(1)) * 100
    t = stratified(torch.zeros(64), torch.ones(64) * 3, 50, torch.Generator().manual_seed(2))
    w = composite_weights(random_sigma, interval_lengths(t, torch.zeros(64), torch.ones(64) * 3))
    assert (w >= 0).all() and (w.sum(-1) <= 1 + 1e-6).all()


def test_importance_samples_follow_the_weights():
    near, far = torch.zeros(1), torch.ones(1)
    t = stratified(near, far, 10, None)
    weights = torch.zeros(1, 10)
    weights[0, 7] = 1.0  # all mass in the 8th interval (between midpoints): [0.7, 0.8]
    s = sample_pdf(t, weights, near, far, 200, torch.Generator().manual_seed(0))
    inside = ((s >= 0.7) & (s <= 0.8)).float().mean()
    assert inside > 0.95 and (s >= 0).all() and (s <= 1).all()


# ------------------------------------------------------------------ rays and cameras
def test_rays_hit_the_origin_centred_sphere_where_expected():
    cams = turntable_cameras(CameraConfig(eval_distance=3.0, eval_views=5))
    origins, dirs = camera_rays(cams["c2w"], cams["fovy"], 9, 9)
    centre_o, centre_d = origins[:, 4, 4], dirs[:, 4, 4]  # the middle pixel's ray goes through the origin
    t0, t1, hit = ray_sphere(centre_o, centre_d, radius=1.0)
    assert hit.all()
    assert torch.allclose(t0, torch.full_like(t0, 2.0), atol=1e-5) and torch.allclose(t1, torch.full_like(t1, 4.0), atol=1e-5)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    t0, t1, hit = ray_sphere(o, d, radius=1.0)
    on_sphere = lambda t: (o + d * t[:, None]).norm(dim=-1)  # noqa: E731
    assert torch.allclose(on_sphere(t0)[hit], torch.ones(int(hit.sum())), atol=1e-4)
    assert torch.allclose(on_sphere(t1)[hit], torch.ones(int(hit.sum())), atol=1e-4)
    # a ray that passes the sphere by: miss, empty interval
    t0, t1, hit = ray_sphere(torch.tensor([[0.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]]), 1.0)
    assert not hit.any() and (t1 == t0).all()
    # a camera inside the sphere starts at the near plane
    t0, t1, hit = ray_sphere(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), 2.0, near=0.1)
    assert hit.all() and t0.item() == pytest.approx(0.1) and t1.item() == pytest.approx(2.0)


def test_cameras_look_at_the_origin_with_the_requested_angles():
    cfg = CameraConfig(batch_size=64)
    batch = sample_cameras(cfg, torch.Generator().manual_seed(0))
    c2w, pos = batch["c2w"], batch["c2w"][:, :3, 3]
    assert torch.allclose(pos.norm(dim=-1), batch["distance"], atol=1e-5)
    elevation = torch.rad2deg(torch.asin(pos[:, 2] / pos.norm(dim=-1)))
    azimuth = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0]))
    assert torch.allclose(elevation, batch["elevation"], atol=1e-3)
    assert torch.allclose(azimuth, batch["azimuth"], atol=1e-3)
    forward = -c2w[:, :3, 2]
    assert torch.allclose(forward, -pos / pos.norm(dim=-1, keepdim=True), atol=1e-5)  # looks at the origin
    assert torch.allclose(c2w[:, 2, 0], torch.zeros(64), atol=1e-6)  # image x axis is horizontal (no roll)
    assert (c2w[:, 2, 1] > 0).all()  # image up points to world up
    rot = c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    for key, rng in (("elevation", cfg.elevation_range), ("azimuth", cfg.azimuth_range),
                     ("distance", cfg.distance_range), ("fovy", cfg.fovy_range)):
        assert (batch[key] >= rng[0]).all() and (batch[key] <= rng[1]).all()
    # light positions near the camera side (DreamFusion): mostly in front of the object as seen from the camera
    lights = batch["light_positions"]
    assert ((lights * pos).sum(-1) > 0).float().mean() > 0.7


def test_fov_sets_the_edge_ray_angle_and_views_are_named():
    cams = turntable_cameras(CameraConfig(eval_fovy=60.0, eval_views=1))
    _, dirs = camera_rays(cams["c2w"], cams["fovy"], 2, 2)
    forward = -cams["c2w"][0, :3, 2]
    # pixel centres at +-1/2 of the half-height: tan(angle) = 0.5 * tan(30 deg) in each axis
    cos = (dirs[0, 0, 0] * forward).sum()
    half = 0.5 * math.tan(math.radians(30))
    assert cos.item() == pytest.approx(1 / math.sqrt(1 + 2 * half**2), abs=1e-5)
    assert view_direction(10, 0) == "front" and view_direction(10, 170) == "back"
    assert view_direction(10, -90) == "side" and view_direction(70, 0) == "overhead"
    assert view_direction(0, 200) == "back" and view_direction(0, -44) == "front"


def test_camera_stream_is_a_function_of_seed_and_step():
    cfg = CameraConfig(batch_size=3)
    full = CameraStream(cfg, seed=5)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    resumed = next(iter(CameraStream(cfg, seed=5, start_step=4)))
    assert resumed["step"] == 4
    assert torch.equal(resumed["c2w"], batches[4]["c2w"]) and resumed["render_seed"] == batches[4]["render_seed"]
    other = next(iter(CameraStream(cfg, seed=6, start_step=4)))
    assert not torch.equal(other["c2w"], batches[4]["c2w"])


def test_look_at_straight_down_is_well_defined():
    c2w = look_at(spherical_position(torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([2.0])))
    assert torch.isfinite(c2w).all()
    assert torch.allclose(c2w[0, :3, :3].T @ c2w[0, :3, :3], torch.eye(3), atol=1e-5)


# ------------------------------------------------------------------ hash encoding
def small_grid(**kw) -> HashGrid:
    torch.manual_seed(0)
    cfg = dict(levels=4, features_per_level=2, log2_table_size=12, base_resolution=4, max_resolution=64,
               start_level=4, backend="torch")
    cfg.update(kw)
    return HashGrid(HashGridConfig(**cfg))


def test_hash_grid_shapes_and_per_level_resolutions():
    grid = small_grid()
    assert grid.resolutions == [4, 10, 25, 64]  # floor(4 * (64/4)^(l/3))
    out = grid(torch.rand(100, 3))
    assert out.shape == (100, 8)
    assert grid.num_dense == 2  # 11^3 <= 4096 < 26^3


def test_hash_grid_interpolates_trilinearly():
    grid = small_grid()
    with torch.no_grad():
        grid.embeddings.normal_()
    # at a vertex of the dense level-0 grid (res 4): exactly that vertex's features
    vertex = torch.tensor([[1, 2, 3]])
    x = vertex.float() / 4
    idx = 1 * 25 + 2 * 5 + 3  # strides (res + 1)^2, res + 1, 1
    assert torch.allclose(grid(x)[0, :2], grid.embeddings[idx], atol=1e-6)
    # along a cell edge: linear between the two vertices
    x_mid = (vertex.float() + torch.tensor([[0.25, 0.0, 0.0]])) / 4
    expect = 0.75 * grid.embeddings[idx] + 0.25 * grid.embeddings[idx + 25]
    assert torch.allclose(grid(x_mid)[0, :2], expect, atol=1e-6)
    # hashed levels are continuous too: a tiny step changes the output by a tiny amount
    x = torch.rand(50, 3) * 0.9 + 0.05
    assert (grid(x + 1e-5) - grid(x)).abs().max() < 1e-2


def test_hash_grid_is_differentiable_in_parameters_and_inputs():
    grid = small_grid()
    with torch.no_grad():
        grid.embeddings.normal_()
    x = (torch.rand(20, 3, dtype=torch.float32) * 0.8 + 0.1).requires_grad_(True)
    y = grid(x)
    y.square().sum().backward()
    assert grid.embeddings.grad is not None and grid.embeddings.grad.abs().sum() > 0
    # d/dx against central differences (x stays inside its cells for a small step)
    g = x.grad[0, 0].item()
    e = 1e-3
    xp, xm = x.detach().clone(), x.detach().clone()
    xp[0, 0] += e
    xm[0, 0] -= e
    fd = (grid(xp).square().sum() - grid(xm).square().sum()).item() / (2 * e)
    assert g == pytest.approx(fd, rel=0.05, abs=1e-3)


def test_progressive_levels_mask_features_and_gradients():
    grid = small_grid(start_level=1, start_step=100, update_steps=50)
    assert [grid.config.active_levels(s) for s in (0, 99, 100, 149, 150, 250, 10**6)] == [1, 1, 2, 2, 3, 4, 4]
    grid.set_step(0)
    y = grid(torch.rand(10, 3))
    assert (y[:, 2:] == 0).all() and (y[:, :2] != 0).any()
    y.sum().backward()
    level1 = slice(int(grid.offsets[1]), int(grid.offsets[2]))
    assert (grid.embeddings.grad[level1] == 0).all()
    grid.set_step(10**6)
    assert (grid(torch.rand(10, 3))[:, 6:] != 0).any()


def test_tinycudann_is_used_when_importable_on_cuda_and_torch_otherwise(monkeypatch):
    """backend=auto takes tinycudann's HashGrid when it imports and CUDA is there (faked here: this machine has
    neither), with the grid's own levels and table size; an import failure or backend=torch gives the PyTorch grid."""
    import sys
    import types

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, encoding_config, dtype=None):
            super().__init__()
            self.n_input_dims, self.encoding_config = n_input_dims, encoding_config

    fake = types.ModuleType("tinycudann")
    fake.Encoding = Encoding
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tinycudann", fake)
    grid = small_grid(backend="auto")
    assert isinstance(grid.tcnn, Encoding) and grid.tcnn.n_input_dims == 3
    cfg = grid.tcnn.encoding_config
    assert (cfg["otype"], cfg["n_levels"], cfg["log2_hashmap_size"]) == ("HashGrid", grid.config.levels,
                                                                         grid.config.log2_table_size)
    assert small_grid(backend="torch").tcnn is None
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # `import tinycudann` now raises ImportError
    grid = small_grid(backend="auto")
    assert grid.tcnn is None
    assert grid(torch.rand(5, 3)).shape == (5, 8)


# ------------------------------------------------------------------ field, renderer, regularizers
def ball_field(normal_type=NormalType.finite_difference, blob_scale: float = 10.0) -> RadianceField:
    torch.manual_seed(0)
    enc = HashGridConfig(levels=2, log2_table_size=10, base_resolution=4, max_resolution=8, start_level=2,
                         backend="torch")
    f = RadianceField(FieldConfig(encoding=enc, hidden_dim=8, normal_type=normal_type, blob_scale=blob_scale))
    with torch.no_grad():  # density = the Magic3D blob alone; albedo 0.5
        f.density_net[-1].weight.zero_()
        f.albedo_net[-1].weight.zero_()
    return f


@pytest.mark.parametrize("normal_type", list(NormalType))
def test_blob_normals_point_outward(normal_type):
    f = ball_field(normal_type)
    x = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1) * 0.3
    n = f(x, with_normals=True)["normals"]
    assert torch.allclose(n, x / 0.3, atol=2e-2)


def test_renderer_shading_modes_and_regularizers():
    f = ball_field(blob_scale=100.0)  # a sharp ball of radius ~0.5
    r = VolumeRenderer(RendererConfig(num_samples=64, background_color=[0.0, 0.0, 1.0], background="solid"), f)
    cams = turntable_cameras(CameraConfig(eval_views=2))
    o, d = camera_rays(cams["c2w"], cams["fovy"], 16, 16)
    lights = cams["light_positions"][:, None, None].expand(2, 16, 16, 3)
    albedo = r(o, d, lights, Shading.albedo)
    assert albedo["rgb"].shape == (2, 16, 16, 3) and albedo["opacity"].shape == (2, 16, 16)
    assert albedo["opacity"][:, 8, 8].min() > 0.99 and albedo["opacity"][:, 0, 0].max() < 0.05
    assert torch.allclose(albedo["rgb"][:, 8, 8], torch.full((2, 3), 0.5), atol=0.02)  # albedo 0.5 at the centre
    assert torch.allclose(albedo["rgb"][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=0.05)  # background corner
    lit = r(o, d, lights, Shading.textureless)
    centre = lit["rgb"][:, 8, 8]  # light at the camera, surface facing it: ambient + diffuse = 1
    assert torch.allclose(centre, torch.ones_like(centre), atol=0.1)
    losses = regularizer_losses(lit)
    assert set(losses) == {"sparsity", "opaque", "orient", "z_variance", "convexity"}
    assert losses["orient"] < 0.05  # a ball seen from outside faces the camera
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("normal_type", list(NormalType))
@pytest.mark.parametrize("shading", [Shading.albedo, Shading.diffuse])
def test_evaluation_renders_skip_only_normals_that_cannot_show(normal_type, shading):
    """Evaluation renders skip the normals of each ray's lowest-weight samples up to eval_normal_skip_weight of
    weight: every pixel's normal and lit color moves by at most that budget."""
    torch.manual_seed(0)
    f = ball_field(normal_type, blob_scale=20.0)
    with torch.no_grad():  # a textured field (random albedo and density detail), not only the blob
        for p in f.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cams = turntable_cameras(CameraConfig(eval_views=3))
    o, d = camera_rays(cams["c2w"], cams["fovy"], 12, 12)
    lights = cams["light_positions"][:, None, None].expand(3, 12, 12, 3)
    outs = {}
    for budget in (0.0, 1e-3, 0.2):
        r = VolumeRenderer(RendererConfig(num_samples=32, background="solid", eval_normal_skip_weight=budget), f)
        with torch.no_grad():
            outs[budget] = r(o, d, lights, shading, need_normals=True)
    full = outs[0.0]
    assert full["opacity"][:, 6, 6].min() > 0.9 and full["opacity"][:, 0, 0].max() < 0.5  # a ball on empty space
    for budget in (1e-3, 0.2):
        assert torch.equal(outs[budget]["opacity"], full["opacity"])
        for key in ("rgb", "normal"):  # |normal| <= 1; a lit color moves by at most the light's share (<= 1)
            assert (outs[budget][key] - full[key]).abs().max() <= budget + 1e-6, (budget, key)
    assert (outs[0.2]["normal"] - full["normal"]).abs().max() > 1e-3  # the budget is what is being tested
    with torch.enable_grad():  # training renders compute every sample's normal (the regularizers use them all)
        r = VolumeRenderer(RendererConfig(num_samples=32, background="solid", eval_normal_skip_weight=0.2), f)
        trained = r(o, d, lights, shading, need_normals=True)
    assert torch.allclose(trained["normal"].detach(), full["normal"], atol=1e-5)
    with pytest.raises(ValueError, match="eval_normal_skip_weight"):
        RendererConfig(eval_normal_skip_weight=1.0)


def test_visible_samples_skip_the_lightest_up_to_the_budget():
    w = torch.tensor([[0.5, 0.0004, 0.3, 0.0003, 0.0002], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert visible_samples(w, 1e-3).tolist() == [[True, False, True, False, False], [False] * 5]
    assert visible_samples(w, 5e-4).tolist() == [[True, True, True, False, False], [False] * 5]
    assert visible_samples(w, 0.0).tolist() == [[True, True, True, True, True], [False] * 5]


def test_shading_choice_follows_the_probabilities():
    cfg = ShadingConfig(ambient_only_steps=10, diffuse_prob=0.75, textureless_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    assert all(pick_shading(cfg, 5, gen) == Shading.albedo for _ in range(20))
    picks = [pick_shading(cfg, 100, gen) for _ in range(4000)]
    frac = {s: sum(p == s for p in picks) / len(picks) for s in Shading}
    assert frac[Shading.albedo] == pytest.approx(0.25, abs=0.03)
    assert frac[Shading.textureless] == pytest.approx(0.375, abs=0.03)


def test_weight_schedules():
    assert schedule_value([0.5], 123) == 0.5
    ramp = [1000, 0.15, 0.0, 4000]
    assert schedule_value(ramp, 0) == 0.15 and schedule_value(ramp, 2500) == pytest.approx(0.075)
    assert schedule_value(ramp, 5000) == 0.0
    step = [10000, 0, 1000, 10001]
    assert schedule_value(step, 10000) == 0 and schedule_value(step, 10001) == 1000
    with pytest.raises(ValueError, match="target.regularizers.opaque"):
        RegularizerConfig(opaque=[1.0, 2.0])
    assert RegularizerConfig(orient=[0, 0.0, 0.1, 10]).needs_normals()


# ------------------------------------------------------------------ mesh export
def test_mesh_of_the_blob_is_the_expected_sphere_and_files_round_trip(tmp_path):
    f = ball_field()
    # density softplus(10 (1 - r / 0.5) - 1) = 5  <=>  r = (9 - log(e^5 - 1)) / 20
    r_star = (9 - math.log(math.exp(5) - 1)) / 20
    verts, faces, colors = extract_mesh(f, resolution=64, threshold=5.0)
    radii = np.linalg.norm(verts, axis=1)
    assert abs(radii.mean() - r_star) < 2 * 4 / 63 and radii.std() < 0.02
    assert faces.max() < len(verts) and (colors == 128).all()
    ply = write_ply(tmp_path / "m.ply", verts, faces, colors)
    v2, f2, c2 = read_ply(ply)
    assert np.array_equal(v2, verts) and np.array_equal(f2, faces) and np.array_equal(c2, colors)
    obj = write_obj(tmp_path / "m.obj", verts, faces, colors).read_text().splitlines()
    assert sum(ln.startswith("v ") for ln in obj) == len(verts) and sum(ln.startswith("f ") for ln in obj) == len(faces)
    with pytest.raises(ValueError, match="no surface"):
        extract_mesh(f, resolution=16, threshold=1e4)


# ------------------------------------------------------------------ Perp-Neg
def test_perp_neg_components_and_weights():
    from sdbridge.guidance.perp_neg import perp_neg_guidance, perpendicular
    from sdbridge.views import F_SF, decay, perp_neg_views

    x, y = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = perpendicular(x, y)
    assert torch.allclose((p * y).sum((1, 2, 3)), torch.zeros(3), atol=1e-4)
    views = perp_neg_views(["a cat"] * 4, torch.tensor([0.0, 0.0, 0.0, 80.0]), torch.tensor([0.0, 45.0, 180.0, 0.0]))
    assert views.pos_a[0] == "a cat, front view" and views.mix[0] == 1.0  # straight front: pos = front
    assert views.weights[0, 0].item() == pytest.approx(0.0, abs=1e-3)  # f_fs(1) = 0 by construction
    assert views.weights[0, 1].item() == pytest.approx(-decay(F_SF, 0.0))  # the side view is pushed away
    assert views.mix[1] == pytest.approx(0.5) and views.pos_b[1] == "a cat, side view"
    assert views.pos_b[2] == "a cat, back view" and views.mix[2] == pytest.approx(0.0)  # straight back
    assert views.pos_a[3] == "a cat, overhead view" and (views.weights[3] == 0).all()
    eps = {k: torch.randn(4, 3, 8, 8) for k in ("uncond", "pos_a", "pos_b", "neg_0", "neg_1")}
    out = perp_neg_guidance(eps, views, 7.5)
    # overhead: plain CFG of the overhead prompt
    assert torch.allclose(out[3], eps["uncond"][3] + 7.5 * (eps["pos_a"][3] - eps["uncond"][3]), atol=1e-5)
    # any sample: eps_tgt - CFG(pos) is perpendicular to e_pos
    mix = views.mix.view(-1, 1, 1, 1)
    e_pos = mix * eps["pos_a"] + (1 - mix) * eps["pos_b"] - eps["uncond"]
    extra = out - eps["uncond"] - 7.5 * e_pos
    assert torch.allclose((extra * e_pos).sum((1, 2, 3)), torch.zeros(4), atol=1e-3)


def test_convexity_loss_matches_the_hand_computed_cross_products():
    from sdbridge.targets.nerf.regularizers import RegularizerConfig, convexity_loss

    flat = torch.tensor([0.3, -0.2, 0.9]).expand(1, 6, 6, 3)
    assert convexity_loss(flat, torch.ones(1, 6, 6), 4).abs() < 1e-7  # parallel normals: no turning, no loss
    n = torch.nn.functional.normalize(torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    opacity = torch.tensor([[[1.0, 0.5], [0.8, 1.0]]])
    s = (n + 1) / 2 * opacity[..., None]  # threestudio's comp_normal; res 2 keeps the 2x2 map as it is

    def cross_z(a, b):
        return a[0] * b[1] - a[1] * b[0]

    horizontal = (cross_z(s[0, 0, 0], s[0, 0, 1]) + cross_z(s[0, 1, 0], s[0, 1, 1])) / 2  # left x right
    vertical = (cross_z(s[0, 1, 0], s[0, 0, 0]) + cross_z(s[0, 1, 1], s[0, 0, 1])) / 2  # down x up
    torch.testing.assert_close(convexity_loss(n, opacity, 2), -(horizontal + vertical))
    config = RegularizerConfig(convexity=[0, 1.0, 0.1, 4000])
    assert config.needs_normals() and config.weights(2000)["convexity"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="convexity_res"):
        RegularizerConfig(convexity_res=1)


def test_random_flip_mirrors_the_whole_batch_with_its_probability(stub_prior):
    """``target.random_flip`` (LucidDreamer's ``RandomHorizontalFlip(p=0.5)`` on the stacked renders): the step's
    renders are mirrored left-right together, or not at all; a drawn coin per step, from the step's render seed."""
    from sdbridge.targets.nerf.cameras import CameraStream
    from sdbridge.targets.nerf.target import NeRFTarget, NeRFTargetConfig

    cfg = dict(resolutions=[16], eval_resolution=16, mesh_resolution=0, cameras=CameraConfig(batch_size=2),
               renderer=RendererConfig(num_samples=32))  # the flip, not the sampling, is under test
    plain = NeRFTarget(NeRFTargetConfig(**cfg), stub_prior, 1, torch.Generator().manual_seed(0), ["a cat"])
    always = NeRFTarget(NeRFTargetConfig(**cfg, random_flip=1.0), stub_prior, 1, torch.Generator().manual_seed(0),
                        ["a cat"])
    half = NeRFTarget(NeRFTargetConfig(**cfg, random_flip=0.5), stub_prior, 1, torch.Generator().manual_seed(0),
                      ["a cat"])
    stream = iter(CameraStream(NeRFTargetConfig(**cfg).cameras, seed=3))
    flipped = []
    for _ in range(12):
        batch = next(stream)
        ref = plain(batch).images
        same = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731 (the resize to the prior's size rounds)
        assert same(always(batch).images, ref.flip(-1))
        got = half(batch).images
        assert same(got, ref) != same(got, ref.flip(-1))
        flipped.append(same(got, ref.flip(-1)))
    assert 0 < sum(flipped) < 12
    with pytest.raises(ValueError, match="random_flip"):
        NeRFTargetConfig(random_flip=1.5)
