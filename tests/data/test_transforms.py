import numpy as np
import pytest
import torch
from PIL import Image

from glassmetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from glassmetric.errors import ConfigError


def _image(width=90, height=60):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(90, 60), (31, 200)])
def test_output_shape(train, size):
    out = build_transforms(train, 32)(_image(*size))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_is_deterministic_and_train_is_random():
    image = _image()
    evaluate = build_transforms(False, 32)
    assert torch.equal(evaluate(image), evaluate(image))
    train = build_transforms(True, 32)
    torch.manual_seed(0)
    assert not all(torch.equal(train(image), train(image)) for _ in range(3))


def test_eval_resize_then_center_crop_and_normalisation():
    steps = build_transforms(False, 224).transforms
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    assert build_transforms(False, 224, resize=300).transforms[0].size == 300
    grey = Image.new("RGB", (40, 50), (128, 128, 128))
    out = build_transforms(False, 16)(grey)
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_bad_sizes():
    with pytest.raises(ConfigError, match="image_size"):
        build_transforms(False, 0)
    with pytest.raises(ConfigError, match="resize"):
        build_transforms(False, 64, resize=32)
