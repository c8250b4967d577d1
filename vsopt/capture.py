"""Deprecated path of vsopt.calibration.capture."""
from vsopt._moved import alias

alias(__name__, "vsopt.calibration.capture")
