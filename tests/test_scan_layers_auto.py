"""runtime.scan_layers=auto: the tiny default's models stay unrolled, a deeper checkpoint is scanned."""

import numpy as np
import pytest

from hf_factory import make_checkpoint
from models import ModelConfig, load_pretrained
from models.config import SCAN_LAYERS_FROM, ConfigError, scans_layers
from rlmt_jax.settings.config import resolve


def test_auto_scans_from_the_threshold_on_and_true_false_are_kept():
    assert [scans_layers("auto", n) for n in (2, SCAN_LAYERS_FROM - 1, SCAN_LAYERS_FROM, 32)] == [
        False, False, True, True]
    assert scans_layers(True, 2) is True and scans_layers(False, 32) is False
    with pytest.raises(ConfigError, match="scan_layers must be true, false or 'auto'"):
        scans_layers("yes", 4)


def test_the_tiny_default_says_auto_and_the_recipes_scan():
    assert resolve(None, []).runtime.scan_layers == "auto"
    assert resolve("grpo_llama31_8b_instruct", []).runtime.scan_layers is True


def test_a_checkpoint_loaded_with_auto_is_scanned_by_its_depth_with_the_same_logits(tmp_path):
    shallow, _ = make_checkpoint(tmp_path / "shallow", "llama3", num_hidden_layers=2)
    deep, _ = make_checkpoint(tmp_path / "deep", "llama3", num_hidden_layers=SCAN_LAYERS_FROM)
    assert load_pretrained(shallow, scan_layers="auto").config.scan_layers is False
    scanned = load_pretrained(deep, scan_layers="auto")
    assert scanned.config.scan_layers is True
    assert ModelConfig.from_pretrained(deep, scan_layers="auto").scan_layers is True
    tokens = np.array([[1, 5, 9, 4, 7]], np.int32)
    unrolled = load_pretrained(deep, scan_layers=False)
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(unrolled(tokens)), atol=1e-5)
