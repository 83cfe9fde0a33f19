"""The demo's digit classifier reaches high accuracy on the val split of the embedded MNIST digits."""

import numpy as np
import pytest

from epg.data.demo import prepare_demo
from epg.eval.digits import class_accuracy, load_or_train, read_shards


@pytest.mark.slow
def test_digit_classifier_accuracy(tmp_path):
    info = prepare_demo(tmp_path / "data")
    model = load_or_train(info["train_shards"], tmp_path / "clf.pt")
    images, labels = read_shards(info["val_shards"])
    assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
    acc = class_accuracy(model, images, labels)
    assert acc > 0.93, acc
    # Shuffled labels score at chance: the metric measures class agreement.
    assert class_accuracy(model, images, np.random.default_rng(0).permutation(labels)) < 0.3
    assert (tmp_path / "clf.pt").is_file()
    cached = load_or_train(info["train_shards"], tmp_path / "clf.pt")
    assert class_accuracy(cached, images, labels) == acc
