"""Per-sample transforms of method.md §7."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from epg.data.adm_crop import adm_center_crop
from epg.data.transforms import EvalTransform, FinetuneTransform, PretrainViews, RandomGaussianBlur
from epg.method.normalization import denormalize


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _pixels(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("mode", ["imagenet", "simple"])
def test_eval_is_the_normalized_image_and_inverts(image, mode):
    x = EvalTransform(32, mode)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(denormalize(x, mode), _pixels(image), atol=1e-6, rtol=0)
    assert torch.equal(x, EvalTransform(32, mode)(image))


def test_eval_crops_other_sizes_with_adm():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    x = EvalTransform(16, "simple")(big)
    torch.testing.assert_close(denormalize(x, "simple"), _pixels(adm_center_crop(big, 16)), atol=1e-6, rtol=0)


def test_finetune_flips_half_the_time(image):
    torch.manual_seed(0)
    plain = EvalTransform(32)(image)
    flips = []
    for _ in range(200):
        x = FinetuneTransform(32)(image)
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        flips.append(not torch.equal(x, plain))
    assert 0.4 < np.mean(flips) < 0.6


def test_pretrain_views(image):
    torch.manual_seed(0)
    views = PretrainViews(32)
    plain = EvalTransform(32)(image)
    x0, v1, v2_ = views(image)
    for x in (x0, v1, v2_):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
        u = denormalize(x)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    assert torch.equal(x0, plain) or torch.equal(x0, plain.flip(-1))
    assert not torch.equal(v1, v2_) and not torch.equal(v1, x0)
    x0_small, v1_small, _ = PretrainViews(16)(image.resize((24, 24)))
    assert x0_small.shape == v1_small.shape == (3, 16, 16)


def test_view_recipes_are_asymmetric():
    views = PretrainViews(32)
    blur1 = [t for t in views.view1.transforms if isinstance(t, RandomGaussianBlur)][0]
    blur2 = [t for t in views.view2.transforms if isinstance(t, RandomGaussianBlur)][0]
    assert (blur1.p, blur2.p) == (1.0, 0.1) and blur1.radius == (0.1, 2.0)
    assert not any(isinstance(t, v2.RandomSolarize) for t in views.view1.transforms)
    solarize = [t for t in views.view2.transforms if isinstance(t, v2.RandomSolarize)][0]
    assert solarize.p == 0.2 and solarize.threshold == 128
    crop = views.view1.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))


def test_blur_probability(image):
    assert RandomGaussianBlur(p=0.0)(image) is image
    blurred = np.asarray(RandomGaussianBlur(p=1.0, radius=(2.0, 2.0))(image)).astype(float)
    assert blurred.std() < np.asarray(image).astype(float).std()


def test_hflip_off_keeps_images_unflipped():
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :4] = 255  # asymmetric: a bright left band
    image = Image.fromarray(arr)
    ref = EvalTransform(16, "simple")(image)
    no_flip = FinetuneTransform(16, "simple", hflip=False)
    assert all(torch.equal(no_flip(image), ref) for _ in range(20))
    views = PretrainViews(16, "simple", hflip=False)
    assert all(torch.equal(views(image)[0], ref) for _ in range(20))
    flip = FinetuneTransform(16, "simple")
    assert any(not torch.equal(flip(image), ref) for _ in range(40))
