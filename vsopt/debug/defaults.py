"""The debugger's defaults, in a module without torch so that `vsopt diff --help` stays light."""

DEFAULT_THRESHOLD = 0.05  # relative L2 of a site's output above which it is flagged
