"""Deprecated path of vsopt.debug.targets."""
from vsopt._moved import alias

alias(__name__, "vsopt.debug.targets")
