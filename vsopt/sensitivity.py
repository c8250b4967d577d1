"""Deprecated path of vsopt.calibration.sensitivity."""
from vsopt._moved import alias

alias(__name__, "vsopt.calibration.sensitivity")
