"""The pass infrastructure: what every pass receives, what it returns, and how a pipeline runs.

A pass is a module in passes/ named after what it does, exposing

    NAME: str
    def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport

It edits gm in place and returns a PassReport listing what it changed (never global counters).
Passes read shapes only from node.meta["val"] (they never run the model), and every node a pass
creates gets node.meta["vsopt_from"] = (pass name, names of the nodes it replaces) for provenance.
Rewritten attention nodes carry node.meta["vsopt_site"] = site_id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Sequence

import torch.fx

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import PassError, VsoptError
from vsopt.core.ir import AttentionSite, SkippedSite


@dataclass
class PassReport:
    """What one pass changed."""

    name: str
    created: list[str] = field(default_factory=list)  # names of nodes added
    removed: list[str] = field(default_factory=list)  # names of nodes erased
    notes: list[str] = field(default_factory=list)  # human-readable remarks (one line each)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.removed)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run over one graph."""

    config: VsoptConfig
    sites: list[AttentionSite] = field(default_factory=list)  # filled by detection, in graph order
    skipped: list[SkippedSite] = field(default_factory=list)  # candidates left alone, with reasons
    ran: list[str] = field(default_factory=list)  # names of the passes run so far
    scratch: dict[str, Any] = field(default_factory=dict)  # pass-to-pass data within this run

    def site(self, site_id: str) -> AttentionSite:
        for s in self.sites:
            if s.site_id == site_id:
                return s
        raise KeyError(f"no attention site {site_id!r}; sites are {[s.site_id for s in self.sites]}")


@dataclass
class PipelineReport:
    """Everything a pipeline run found and changed; returned by run_pipeline."""

    sites: list[AttentionSite]
    skipped: list[SkippedSite]
    passes: list[PassReport]


def run_pipeline(gm: torch.fx.GraphModule, ctx: PassContext, pipeline: Sequence[ModuleType]) -> PipelineReport:
    """Run each pass module of `pipeline` over gm in order. A failure becomes a PassError naming the
    pass and the passes that ran before it."""
    reports = []
    for p in pipeline:
        try:
            reports.append(p.run(gm, ctx))
        except PassError:
            raise
        except VsoptError:
            raise  # already a clear, user-facing error (e.g. strict mode)
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(p.NAME, f"{type(e).__name__}: {e}", ran_before=tuple(ctx.ran)) from e
        ctx.ran.append(p.NAME)
    gm.graph.lint()
    gm.recompile()
    return PipelineReport(sites=list(ctx.sites), skipped=list(ctx.skipped), passes=reports)
