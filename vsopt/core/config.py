"""VsoptConfig: the validated, frozen form of the options a user passes to
torch.compile(model, backend="vsopt", options={...}) and to the API functions.

Free-form dicts stop here: everything below the front reads typed fields."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError
from .ir import TokenGrid


def _as_grid(value: Any, where: str) -> TokenGrid:
    if isinstance(value, TokenGrid):
        return value
    if isinstance(value, Mapping):
        try:
            return TokenGrid.from_dict(dict(value))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a valid grid {dict(value)!r}: {e}") from None
    if isinstance(value, (tuple, list)) and len(value) in (3, 4, 5):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: grid sizes must be integers, got {tuple(value)!r}")
        try:
            return TokenGrid(*value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a valid grid {tuple(value)!r}: {e}") from None
    raise ConfigError(f"{where}: expected a TokenGrid, a dict with frames/height/width, or a tuple "
                      f"(frames, height, width[, text_before[, text_after]]); got {value!r}")


@dataclass(frozen=True)
class VsoptConfig:
    """Options of the vsopt backend.

    plan:   a Plan object or the path of a plan JSON file; None means every site runs the exact
            dense vsopt op.
    strict: make any site (or attention candidate) left unoptimized an error naming the reason.
    grid:   a TokenGrid for every site whose query length is its token count; it wins over the
            grid inferred from the graph. A grid that fits no site of a graph is not used: a
            warning (logger "vsopt"), a ConfigError in strict mode.
    grids:  per-site_id grids; they win over `grid` and inference, and each must have its site's
            query length (ConfigError otherwise).
    rewrite: when False, sites are detected and reported but the graph is left unchanged
            (used by inspect).
    cudagraphs: run each compiled graph under CUDA graphs (Inductor's cudagraph trees, what
            torch.compile's mode="reduce-overhead" turns on; torch.compile does not take a mode
            together with options, so this is vsopt's switch). CUDA only: on another device
            Inductor runs the graph without them. Under CUDA graphs a dynamic head recomputes
            its mask at every step (mask reuse across steps is a host-side decision a replayed
            graph cannot make). See docs/RUNTIME.md.
    check_masks_on_device: a joint site whose attention mask the graph cannot prove to keep every
            video x video pair (built in eager code: a graph input) is split anyway, its mask's
            video block checked in the graph by a device-side assert (no host sync; a mask that
            fails it fails the run, never a wrong output): passes/mask_checks.py. True for every
            such site, or the site ids to check (a list or set of str: the others stay dense).
    """

    plan: Any = None  # vsopt.core.plan.Plan | None (loaded from a path by from_options)
    strict: bool = False
    grid: TokenGrid | None = None
    grids: Mapping[str, TokenGrid] = field(default_factory=dict)
    rewrite: bool = True
    cudagraphs: bool = False
    check_masks_on_device: bool | frozenset = False   # True, or the site ids (frozenset of str)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "VsoptConfig":
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"vsopt options must be a dict such as {{'plan': 'm.plan.json', 'strict': True}}, "
                              f"got {type(options).__name__} {options!r}")
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown vsopt option(s) {unknown}; valid options are {sorted(known)}")
        if "strict" in options and not isinstance(options["strict"], bool):
            raise ConfigError(f"option 'strict' must be True or False, got {options['strict']!r}")
        for name in ("rewrite", "cudagraphs"):
            if name in options and not isinstance(options[name], bool):
                raise ConfigError(f"option {name!r} must be True or False, got {options[name]!r}")
        checks = options.get("check_masks_on_device")
        if checks is not None and not isinstance(checks, bool):
            if isinstance(checks, str) or not isinstance(checks, (list, tuple, set, frozenset)) \
                    or not all(isinstance(i, str) for i in checks):
                raise ConfigError("option 'check_masks_on_device' must be True, False or a list of site ids, "
                                  f"got {checks!r}")
            options["check_masks_on_device"] = frozenset(checks)
        if options.get("grid") is not None:
            options["grid"] = _as_grid(options["grid"], "option 'grid'")
        if "grids" in options:
            if not isinstance(options["grids"], Mapping):
                raise ConfigError(f"option 'grids' must map site ids to grids, got {options['grids']!r}")
            options["grids"] = {str(k): _as_grid(v, f"option 'grids'[{k!r}]") for k, v in options["grids"].items()}
        plan = options.get("plan")
        if plan is not None:
            from .plan import Plan  # local: plan.py is heavier and not needed without a plan

            if isinstance(plan, (str, os.PathLike)):
                options["plan"] = Plan.load(plan)
            elif not isinstance(plan, Plan):
                raise ConfigError(f"option 'plan' must be a vsopt Plan or the path of a .plan.json file, got "
                                  f"{type(plan).__name__} {plan!r:.60}")
        return cls(**options)

    def checks_mask_of(self, site_id: str) -> bool:
        """Whether option check_masks_on_device covers this site (True: every site)."""
        c = self.check_masks_on_device
        return c is True or (isinstance(c, frozenset) and site_id in c)

    def grid_for(self, site_id: str) -> TokenGrid | None:
        """The grid the user gave for a site (per-site, else the global one), whether or not it
        fits the site: passes/infer_grid.py decides which grid a site gets."""
        return self.grids.get(site_id, self.grid)
