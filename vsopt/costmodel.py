"""Deprecated path of vsopt.core.costmodel."""
from vsopt._moved import alias

alias(__name__, "vsopt.core.costmodel")
