"""Image sources, input errors and result tables of epg.eval (no Inception forward passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from epg.eval.errors import EvalInputError
from epg.eval.inception import extract_features
from epg.eval.readers import image_batches
from epg.eval.tables import format_comparison, format_results


@pytest.fixture(scope="module")
def one_thread():
    """One torch and BLAS thread: on a busy 2-core machine, 2 threads made Inception 2.5x, eigvals 5x slower."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def photo_crops(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """`count` real-photo crops (uint8, N x size x size x 3) from scikit-learn's two sample photos."""
    datasets = pytest.importorskip("sklearn.datasets")
    photos = datasets.load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[y : y + size, x : x + size])
    return np.stack(crops)


def write_folder(folder, images: np.ndarray):
    """Save images as 000000.png, 000001.png, ... (the order the readers list them in)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


class _NoInception:
    """Stands in for the Inception network where a test must fail before any forward pass."""

    def __call__(self, images):
        raise AssertionError("Inception should not run")


def test_npz_folder_and_array_give_the_same_batches(tmp_path):
    images = photo_crops(7, size=16)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    write_folder(tmp_path / "pngs", images)
    for source in (images, tmp_path / "samples.npz", tmp_path / "pngs"):
        batches = list(image_batches(source, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_grayscale_pngs_become_rgb(tmp_path):
    (tmp_path / "gray").mkdir()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "gray" / "a.png")
    (batch,) = image_batches(tmp_path / "gray")
    assert batch.shape == (1, 8, 8, 3) and (batch == 100).all()


def test_clear_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="no .png/.jpg/.jpeg images in folder"):
        list(image_batches(tmp_path / "empty"))
    with pytest.raises(EvalInputError, match="does not exist"):
        list(image_batches(tmp_path / "nothing_here"))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(EvalInputError, match="expected uint8 images"):
        list(image_batches(tmp_path / "bad.npz"))
    write_folder(tmp_path / "mixed", photo_crops(1, size=16))
    Image.fromarray(photo_crops(1, size=8)[0]).save(tmp_path / "mixed" / "z.png")
    with pytest.raises(EvalInputError, match="share one resolution"):
        list(image_batches(tmp_path / "mixed"))


def test_resolution_mismatch_fails_before_inception():
    with pytest.raises(EvalInputError, match="reference is at 64x64 but the images in .* are 16x16"):
        extract_features(photo_crops(2, size=16), _NoInception(), resolution=(64, 64))


def test_result_tables():
    balanced = {"fid": 2.04, "isc": 283.2, "isc_std": 3.1, "precision": 0.8, "recall": 0.61}
    table = format_comparison({"class-balanced": balanced, "random": {"fid": 2.1}})
    lines = table.splitlines()
    assert lines[0].split() == ["mode", "FID", "IS", "Prec", "Rec"]
    assert lines[1].split() == ["class-balanced", "2.040", "283.200", "0.8000", "0.6100"]
    assert lines[2].split() == ["random", "2.100", "-", "-", "-"]
    assert "IS       283.200 ± 3.100" in format_results(balanced)
