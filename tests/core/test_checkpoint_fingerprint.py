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
