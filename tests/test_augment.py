"""Batched per-sample augmentation (training/augment.py): shapes, determinism, parameter layout, and
agreement of each op with torchvision's functional reference on the recorded parameters."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from training.augment import BatchAugment, PipelineConfig, build_augment
from training.views import Views

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
PLAIN = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)  # crop only
ALL_GROUPS = ["crop", "jitter", "blur", "solarize"]


def _images(b: int = 16, c: int = 3, h: int = 32, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w or h), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _run(images: torch.Tensor, groups=ALL_GROUPS, seed: int = 0, **kw) -> Views:
    return BatchAugment([PipelineConfig(**kw)], MEAN, STD, param_groups=groups)(images, _gen(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_float32_normalised_3_channel_crops(channels):
    aug = BatchAugment([PipelineConfig(crop_size=24), PipelineConfig(crop_size=16, blur_p=0.5, solarize_p=0.5)],
                       MEAN, STD, return_original=True)
    out = aug(_images(8, channels, 28), _gen())
    assert isinstance(out, Views) and out.params is None
    assert [tuple(v.shape) for v in out.views] == [(8, 3, 24, 24), (8, 3, 16, 16)]
    assert all(v.dtype == torch.float32 for v in out.views)
    assert tuple(out.original.shape) == (8, 3, 24, 24)  # first pipeline's crop size
    for v in out.views + [out.original]:
        x = _unnorm(v)
        assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
        if channels == 1:  # grayscale input is repeated to 3 channels before normalising
            assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 0], x[:, 2], atol=1e-5)


def test_same_seed_same_views_and_different_seed_different_views():
    images, aug = _images(), build_augment({"views": [{"blur_p": 0.5, "solarize_p": 0.2, "repeat": 2}],
                                            "params": ALL_GROUPS}, MEAN, STD)
    a, b, c = aug(images, _gen(1)), aug(images, _gen(1)), aug(images, _gen(2))
    assert all(torch.equal(x, y) for x, y in zip(a.views + a.params, b.views + b.params))
    assert not torch.equal(a.views[0], c.views[0]) and not torch.equal(a.params[0], c.params[0])
    assert not torch.equal(a.views[0], a.views[1])  # the two views draw independently


def test_augmentation_uses_only_the_given_generator():
    images, aug = _images(), BatchAugment([PipelineConfig()], MEAN, STD)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = aug(images, _gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert torch.equal(a.views[0], aug(images, _gen(5)).views[0])


def test_samples_get_independent_parameters():
    p = _run(_images(64), jitter_p=1.0).params[0]
    assert len({tuple(row[:4].tolist()) for row in p}) > 50  # crop boxes differ across the batch
    assert 0 < p[:, 4].sum() < 64  # some flipped, some not
    assert len({tuple(row[6:10].tolist()) for row in p}) > 10  # jitter orders differ per sample


@pytest.mark.parametrize("groups,length", [(["crop", "jitter"], 15), (["crop", "jitter", "blur"], 17),
                                           (ALL_GROUPS, 18)])
def test_param_vector_lengths_follow_equimod_layout(groups, length):
    aug = BatchAugment([PipelineConfig(blur_p=1.0), PipelineConfig(blur_p=0.1, solarize_p=0.0)], MEAN, STD,
                       param_groups=groups)
    out = aug(_images(8), _gen())
    assert len(out.params) == 2
    assert all(tuple(p.shape) == (8, length) and p.dtype == torch.float32 for p in out.params)
    assert aug.param_dim == length


def test_unknown_param_group_raises():
    with pytest.raises(ValueError, match="rotation"):
        BatchAugment([PipelineConfig()], MEAN, STD, param_groups=["crop", "rotation"])


def test_crop_boxes_lie_in_image_with_area_and_ratio_in_range():
    h_img, w_img, scale, ratio = 40, 30, (0.2, 0.6), (0.5, 2.0)
    p = _run(_images(512, 3, h_img, w_img), ["crop"], crop_size=16, crop_scale=scale, crop_ratio=ratio).params[0]
    i, j, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= h_img).all() and (j + w <= w_img).all()
    assert torch.equal(p[:, :4], p[:, :4].round())  # integer pixel boxes, as torchvision
    frac = h * w / (h_img * w_img)
    # rounding w and h to whole pixels moves the area by up to about one pixel row/column
    slack = (h + w + 1) / (h_img * w_img)
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    aspect = w / h
    assert (aspect >= ratio[0] * (1 - 1 / h) - 0.05).all() and (aspect <= ratio[1] * (1 + 1 / h) + 0.05).all()
    assert i.float().std() > 1 and j.float().std() > 1  # positions actually vary


def test_crop_falls_back_to_centre_crop_when_no_try_fits():
    # ratio 2 at full area never fits a square image: torchvision takes the centre crop w=W, h=W/2
    p = _run(_images(8, 3, 20), ["crop"], crop_size=8, crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0), **PLAIN)
    assert torch.equal(p.params[0][:, :4], torch.tensor([[5.0, 0.0, 10.0, 20.0]]).expand(8, 4))


def test_full_crop_without_colour_ops_reproduces_resized_input():
    same = _images(4, 3, 24)
    out = _run(same, ["crop"], crop_size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **PLAIN)
    assert torch.equal(out.params[0][:, :4], torch.tensor([[0.0, 0.0, 24.0, 24.0]]).expand(4, 4))
    assert torch.allclose(_unnorm(out.views[0]), same.float() / 255, atol=1e-5)
    big = _images(4, 3, 32)  # crop then bilinear resize (grid_sample has no antialiasing)
    out = _run(big, None, crop_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **PLAIN)
    ref = F.interpolate(big.float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(_unnorm(out.views[0]), ref, atol=1e-5)


def test_crop_matches_torchvision_resized_crop_on_recorded_box():
    images = _images(6, 3, 36)
    out = _run(images, ["crop"], crop_size=20, **PLAIN)
    for k, (i, j, h, w, _) in enumerate(out.params[0].int().tolist()):
        ref = TF.resized_crop(images[k].float() / 255, i, j, h, w, [20, 20], antialias=False)
        assert torch.allclose(_unnorm(out.views[0][k:k + 1])[0], ref, atol=1e-4)


def test_flipped_view_is_the_mirrored_unflipped_view():
    images = _images(12)
    kw = dict(jitter_p=0.8, gray_p=0.3, blur_p=0.5, solarize_p=0.3)
    a = _run(images, flip_p=0.0, **kw)
    b = _run(images, flip_p=1.0, **kw)
    pa, pb = a.params[0], b.params[0]
    assert (pa[:, 4] == 0).all() and (pb[:, 4] == 1).all()
    assert torch.equal(torch.cat([pa[:, :4], pa[:, 5:]], 1), torch.cat([pb[:, :4], pb[:, 5:]], 1))
    assert torch.allclose(b.views[0], a.views[0].flip(-1), atol=1e-4)


def test_unjittered_samples_record_identity_factors_and_order():
    p = _run(_images(32), jitter_p=0.0, gray_p=0.0).params[0]
    identity = torch.tensor([0, 0, 1, 2, 3, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(p[:, 5:15], identity.expand(32, 10))


def test_jitter_params_are_permutations_and_factors_in_torchvision_ranges():
    v = (0.4, 0.3, 0.8, 0.1)
    p = _run(_images(256), ["jitter"], jitter=v, jitter_p=0.5, gray_p=0.0).params[0]
    applied = p[:, 0] == 1
    assert 0.3 < applied.float().mean() < 0.7
    assert torch.equal(p[:, 1:5].sort(dim=1).values, torch.arange(4.0).expand(256, 4))
    f = p[applied, 5:9]
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.2, 1.8), (-0.1, 0.1)]):
        assert (f[:, col] >= lo - 1e-6).all() and (f[:, col] <= hi + 1e-6).all()
        assert f[:, col].max() - f[:, col].min() > (hi - lo) / 2  # actually spread over the range
    assert torch.equal(p[~applied, 1:9], torch.tensor([0, 1, 2, 3, 1, 1, 1, 0.0]).expand(int((~applied).sum()), 8))


def test_jitter_applies_torchvision_ops_in_each_samples_recorded_order():
    images = _images(24, 3, 16)
    out = _run(images, ["crop", "jitter"], crop_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
               flip_p=0.0, jitter=(0.6, 0.6, 0.6, 0.3), jitter_p=0.75, gray_p=0.0)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k, row in enumerate(out.params[0].tolist()):
        x = images[k].float() / 255
        if row[5]:
            for op in row[6:10]:
                x = ops[int(op)](x, row[10 + int(op)])
        assert torch.allclose(_unnorm(out.views[0][k:k + 1])[0], x, atol=1e-4), f"sample {k}, params {row}"


def test_grayscale_input_jitter_matches_torchvision_brightness_and_contrast():
    images = _images(16, 1, 12)
    out = _run(images, ["crop", "jitter"], crop_size=12, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
               flip_p=0.0, jitter=(0.5, 0.5, 0.4, 0.1), jitter_p=1.0, gray_p=1.0)
    ops = (TF.adjust_brightness, TF.adjust_contrast)
    for k, row in enumerate(out.params[0].tolist()):
        x = images[k].float() / 255
        for op in row[6:10]:
            if op < 2:  # saturation, hue and grayscale do nothing to one channel
                x = ops[int(op)](x, row[10 + int(op)])
        assert torch.allclose(_unnorm(out.views[0][k:k + 1])[0], x.expand(3, -1, -1), atol=1e-5)


def test_grayscale_makes_equal_channels_and_is_recorded():
    out = _run(_images(16), gray_p=1.0, jitter_p=0.0)
    x = _unnorm(out.views[0])
    assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 1], x[:, 2], atol=1e-5)
    assert (out.params[0][:, 14] == 1).all()
    ref = _run(_images(16), gray_p=0.0, jitter_p=0.0)
    assert torch.allclose(x, TF.rgb_to_grayscale(_unnorm(ref.views[0]), 3), atol=1e-5)


def test_blur_matches_torchvision_and_reduces_high_frequencies():
    images = _images(8, 3, 32)
    kw = dict(crop_size=32, jitter_p=0.0, gray_p=0.0, blur_sigma=(0.5, 2.0))
    sharp, blurred = _run(images, **kw, blur_p=0.0), _run(images, **kw, blur_p=1.0)
    p = blurred.params[0]
    assert (p[:, 15] == 1).all() and (p[:, 16] >= 0.5).all() and (p[:, 16] <= 2.0).all()
    assert (sharp.params[0][:, 15:17] == 0).all()  # sigma recorded as 0 when not applied
    x0, x1 = _unnorm(sharp.views[0]), _unnorm(blurred.views[0])
    k = PipelineConfig(crop_size=32).kernel_size
    for n in range(8):
        ref = TF.gaussian_blur(x0[n], [k, k], [float(p[n, 16])] * 2)
        assert torch.allclose(x1[n], ref, atol=1e-5)

    def hf(x):  # energy of the discrete Laplacian
        return (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2]
                - x[..., 1:-1, 2:]).pow(2).mean(dim=(1, 2, 3))

    assert (hf(x1) < 0.5 * hf(x0)).all()


def test_default_blur_kernel_is_about_ten_percent_of_the_crop_and_odd():
    assert [PipelineConfig(crop_size=s).kernel_size for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert PipelineConfig(blur_kernel=5).kernel_size == 5
    with pytest.raises(ValueError, match="blur_kernel"):
        PipelineConfig(blur_kernel=4)


def test_solarize_inverts_pixels_above_threshold():
    images = _images(8)
    plain = _run(images, solarize_p=0.0, solarize_threshold=0.4)
    solar = _run(images, solarize_p=1.0, solarize_threshold=0.4)
    x = _unnorm(plain.views[0])
    assert (solar.params[0][:, 17] == 1).all() and (plain.params[0][:, 17] == 0).all()
    assert torch.allclose(_unnorm(solar.views[0]), torch.where(x >= 0.4, 1 - x, x), atol=1e-5)


def test_probabilities_set_per_sample_application_rates():
    p = _run(_images(1000, 1, 8), crop_size=8, flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_p=0.3,
             solarize_p=0.1).params[0]
    for col, prob in [(4, 0.5), (5, 0.8), (14, 0.2), (15, 0.3), (17, 0.1)]:
        assert abs(p[:, col].mean().item() - prob) < 0.06, (col, p[:, col].mean())


def test_identity_pipeline_and_original_are_the_resized_images():
    images = _images(4, 1, 28)
    aug = BatchAugment([PipelineConfig(crop_size=14, identity=True), PipelineConfig(crop_size=14)], MEAN, STD,
                       param_groups=ALL_GROUPS, return_original=True)
    a, b = aug(images, _gen(0)), aug(images, _gen(1))
    ref = F.interpolate(images.float() / 255, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(a.views[0], b.views[0]) and torch.equal(a.original, b.original)
    assert torch.allclose(_unnorm(a.views[0]), ref.expand(-1, 3, -1, -1), atol=1e-5)
    assert torch.equal(a.views[0], a.original)
    identity = torch.tensor([0, 0, 28, 28, 0, 0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.float32)
    assert torch.equal(a.params[0], identity.expand(4, 18))


def test_build_augment_reads_recipe_section():
    aug = build_augment({"views": [{"crop_size": 28, "crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1],
                                    "gray_p": 0.2, "repeat": 2}, {"crop_size": 12, "solarize_p": 0.2}],
                         "params": ["crop", "jitter"], "original": True}, MEAN, STD)
    assert [p.crop_size for p in aug.pipelines] == [28, 28, 12]
    assert aug.pipelines[0].crop_scale == (0.2, 1.0) and aug.pipelines[0] is not aug.pipelines[1]
    assert aug.param_groups == ["crop", "jitter"] and aug.return_original
    out = aug(_images(4, 1, 28), _gen())
    assert [tuple(p.shape) for p in out.params] == [(4, 15)] * 3 and out.original is not None
    plain = build_augment({"views": [{}]}, MEAN, STD)
    assert plain.param_groups is None and not plain.return_original


@pytest.mark.parametrize("config,key", [({"views": [{}], "param": ["crop"]}, "param"),
                                        ({"views": [{"crop_sz": 28}]}, "crop_sz")])
def test_unknown_config_key_raises_naming_it_and_the_allowed_ones(config, key):
    with pytest.raises(ValueError, match=key) as err:
        build_augment(config, MEAN, STD)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize("bad", [dict(flip_p=1.5), dict(jitter=(0.4, 0.4, 0.4, 0.7)), dict(crop_scale=(0.8, 0.2)),
                                 dict(crop_size=0)])
def test_invalid_pipeline_values_raise(bad):
    with pytest.raises(ValueError):
        PipelineConfig(**bad)


def test_rejects_images_of_wrong_shape():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        BatchAugment([PipelineConfig()], MEAN, STD)(_images(2, 4, 8), _gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views():
    images = _images(32)
    aug = BatchAugment([PipelineConfig(blur_p=0.5, solarize_p=0.2)] * 2, MEAN, STD, param_groups=ALL_GROUPS,
                       return_original=True)
    cpu, gpu = aug(images, _gen(3)), aug(images.cuda(), _gen(3))
    assert all(v.is_cuda for v in gpu.views + gpu.params + [gpu.original])
    for a, b in zip(cpu.views + cpu.params + [cpu.original], gpu.views + gpu.params + [gpu.original]):
        assert torch.allclose(a, b.cpu(), atol=1e-3)


def test_cpu_thread_count_is_restored_after_a_call():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        aug = BatchAugment([PipelineConfig(crop_size=8)], MEAN, STD)
        a = aug(_images(4, 3, 8), _gen())
        assert torch.get_num_threads() == 2
        b = BatchAugment([PipelineConfig(crop_size=8)], MEAN, STD, cpu_threads=None)(_images(4, 3, 8), _gen())
        assert torch.allclose(a.views[0], b.views[0], atol=1e-6)  # thread count changes speed, not results
    finally:
        torch.set_num_threads(before)
