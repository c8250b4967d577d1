"""Deprecated path of vsopt.debug.graph."""
from vsopt._moved import alias

alias(__name__, "vsopt.debug.graph")
