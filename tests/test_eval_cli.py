"""`epg fid ref|calc|gen` on tiny real-photo crops (Inception on CPU: ~0.3 s per image, so 10 images per set)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch_fidelity

from epg.commands.fid import main
from epg.eval.distances import frechet_distance
from epg.eval.inception import InceptionFeatures
from epg.eval.inception_weights import ensure_inception_weights
from epg.eval.reference import compute_reference, load_reference
from tests.test_eval_metrics import one_thread, photo_crops, write_folder

N = 8
pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Folders real/ (A), samples/ (B, other crops), noise/; shards of A; B as an ADM-style npz; A's reference."""
    import webdataset as wds

    ensure_inception_weights()
    root = tmp_path_factory.mktemp("fid")
    real, samples = photo_crops(N, seed=0), photo_crops(N, seed=1)
    write_folder(root / "real", real)
    write_folder(root / "samples", samples)
    write_folder(root / "noise", np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    (root / "shards").mkdir()
    for shard, part in enumerate((range(0, 5), range(5, N))):
        with wds.TarWriter(str(root / "shards" / f"train-{shard:06d}.tar")) as sink:
            for i in part:
                sink.write({"__key__": f"{i:06d}", "png": (root / "real" / f"{i:06d}.png").read_bytes(), "cls": 0})
    np.savez(root / "samples.npz", arr_0=samples)
    assert main(["ref", str(root / "real"), "--out", str(root / "ref.npz"), "--device", "cpu"]) == 0
    return root


def test_reference_from_shards_equals_folder(sets):
    assert main(["ref", str(sets / "shards"), "--out", str(sets / "ref_shards.npz"), "--device", "cpu"]) == 0
    folder, shards = load_reference(sets / "ref.npz"), load_reference(sets / "ref_shards.npz")
    assert folder.count == shards.count == N and folder.resolution == shards.resolution == (32, 32)
    assert folder.mu.dtype == np.float64 and folder.sigma.shape == (2048, 2048) and folder.pool.shape == (N, 2048)
    np.testing.assert_allclose(shards.pool, folder.pool, atol=1e-4)
    np.testing.assert_allclose(shards.sigma, folder.sigma, atol=1e-5)
    # The same set through two readers: FID ~ 0.
    assert abs(frechet_distance(shards.mu, shards.sigma, folder.mu, folder.sigma)) < 1e-2


def test_calc_equals_torch_fidelity(sets, capsys):
    ref = str(sets / "ref.npz")
    out = sets / "results.json"
    assert main(["calc", str(sets / "samples"), "--ref", ref, "--metrics", "fid,kid,prc", "--out", str(out)]) == 0
    assert "FID" in capsys.readouterr().out
    ours = json.loads(out.read_text())["metrics"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(sets / "samples"),
        input2=str(sets / "real"),
        cuda=False,
        fid=True,
        kid=True,
        prc=True,
        kid_subset_size=N,
        feature_extractor="inception-v3-compat",  # torch-fidelity's PR default is VGG16; ADM uses Inception pool_3
        feature_layer_prc="2048",
        feature_extractor_weights_path=str(ensure_inception_weights()),
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    assert ours["fid"] > 20


def test_noise_scores_far_worse_than_photos(sets):
    out = sets / "noise.json"
    assert (
        main(["calc", str(sets / "noise"), "--ref", str(sets / "ref.npz"), "--metrics", "fid", "--out", str(out)]) == 0
    )
    # Other crops of the same two photos score ~196 at this tiny N; uniform noise ~435.
    assert json.loads(out.read_text())["metrics"]["fid"] > 300


def test_npz_samples_equal_png_folder(sets):
    ref = str(sets / "ref.npz")
    for source, out in (("samples.npz", "npz.json"), ("samples", "pngs.json")):
        assert main(["calc", str(sets / source), "--ref", ref, "--metrics", "kid,prc", "--out", str(sets / out)]) == 0
    npz, pngs = (json.loads((sets / out).read_text()) for out in ("npz.json", "pngs.json"))
    assert npz["num_samples"] == pngs["num_samples"] == N
    assert npz["metrics"] == pytest.approx(pngs["metrics"], rel=1e-5, abs=1e-7)


def test_adm_reference_npz_keeps_its_statistics(sets):
    folder = load_reference(sets / "ref.npz")
    real = photo_crops(N, seed=0)[:3]
    mu, sigma = np.arange(2048.0), np.eye(2048)
    np.savez(sets / "VIRTUAL_tiny.npz", arr_0=real, mu=mu, sigma=sigma)
    adm = compute_reference(sets / "VIRTUAL_tiny.npz", InceptionFeatures(device="cpu"))
    np.testing.assert_array_equal(adm.mu, mu)
    np.testing.assert_array_equal(adm.sigma, sigma)
    np.testing.assert_allclose(adm.pool, folder.pool[:3], atol=1e-4)
    assert adm.resolution == (32, 32) and adm.count == 3 and adm.mu_s.shape == (7 * 17 * 17,)


def test_calc_errors_are_one_line(sets, tmp_path, capsys):
    write_folder(tmp_path / "small", photo_crops(2, size=16))
    (tmp_path / "empty").mkdir()
    ref = str(sets / "ref.npz")
    cases = {
        (str(tmp_path / "small"), ref): "reference is at 32x32 but the images",
        (str(tmp_path / "empty"), ref): "no .png/.jpg/.jpeg images in folder",
        (str(tmp_path / "missing"), ref): "does not exist",
        (str(tmp_path / "small"), str(tmp_path / "missing.npz")): "does not exist; make one with `epg fid ref",
    }
    for (samples, reference), message in cases.items():
        assert main(["calc", samples, "--ref", reference, "--metrics", "fid", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_gen_forwards_to_epg_sample(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "epg.commands.sample", fake)
    assert main(["gen", "--ckpt", "x.ckpt", "--num", "8"]) == 0
    assert seen == [["--ckpt", "x.ckpt", "--num", "8"]]
