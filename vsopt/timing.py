"""Deprecated path of vsopt.core.timing."""
from vsopt._moved import alias

alias(__name__, "vsopt.core.timing")
