"""A calibration checkpoint is reused by the same calibration only: the options that change what the
passes measure change its fingerprint; the search's error weights (measured again by a resumed
--sensitivity run) do not."""
from vsopt.calibration.checkpoint import fingerprint
from vsopt.calibration.options import CalibrationOptions


def test_error_weights_do_not_change_the_fingerprint_and_measuring_options_do():
    base = CalibrationOptions(block_m=64, block_n=64)
    weighted = CalibrationOptions(block_m=64, block_n=64, error_weights={"a": {0: 1.0, 1: 0.25}})
    reweighted = CalibrationOptions(block_m=64, block_n=64, error_weights={"a": {0: 1.0000001, 1: 0.25}})
    assert fingerprint([], [], base) == fingerprint([], [], weighted) == fingerprint([], [], reweighted)
    assert fingerprint([], [], CalibrationOptions(block_m=128, block_n=128)) != fingerprint([], [], base)
    assert weighted.fingerprint()["error_weights"] is not None   # still recorded in the plan


def test_the_weights_probe_is_recorded_not_fingerprinted_and_needs_the_weights():
    import pytest

    from vsopt.calibration.clusters import check_clusters
    from vsopt.core.clustering import ClusterSpec
    from vsopt.core.errors import ConfigError

    weights = {"a": {0: 1.0}}
    probed = CalibrationOptions(error_weights=weights, error_weights_probe="pooled top-k 0.3")
    assert fingerprint([], [], probed) == fingerprint([], [], CalibrationOptions(error_weights=weights))
    assert probed.fingerprint()["error_weights_probe"] == "pooled top-k 0.3"
    with pytest.raises(ConfigError, match="error_weights_probe 'top-k 0.5': .* with error_weights only"):
        CalibrationOptions(error_weights_probe="top-k 0.5")
    # cluster specs are recorded as dicts, which `clusters` takes back
    spec = ClusterSpec(2, 4, 0.7, refresh=2)
    recorded = CalibrationOptions(clusters=(spec,)).fingerprint()["clusters"]
    assert check_clusters(recorded) == (spec,)
