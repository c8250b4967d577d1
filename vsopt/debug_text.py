"""Deprecated path of vsopt.debug.text."""
from vsopt._moved import alias

alias(__name__, "vsopt.debug.text")
