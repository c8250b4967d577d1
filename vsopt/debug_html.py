"""Deprecated path of vsopt.debug.html."""
from vsopt._moved import alias

alias(__name__, "vsopt.debug.html")
