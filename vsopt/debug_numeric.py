"""Deprecated path of vsopt.debug.numeric."""
from vsopt._moved import alias

alias(__name__, "vsopt.debug.numeric")
