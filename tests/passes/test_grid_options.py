"""The grid options (issue 12 item 6): user-given grids win over inference for the sites whose
query length they fit; a global grid that fits no site is said so (an error in strict mode)."""
from __future__ import annotations

import logging

import pytest
import torch

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid

from .test_attention_forms import _PatchifyVideo

INPUTS = (torch.randn(1, 2, 3, 4, 6), torch.randn(1, 5, 16))  # inferred grid 3x2x3+5 (23 tokens)


def _grids(options):
    _, report = trace_and_rewrite(_PatchifyVideo().eval(), INPUTS, VsoptConfig.from_options(options))
    return [(str(s.grid), s.grid_source.value) for s in report.sites]


def test_inferred_grid_without_options():
    assert _grids({}) == [("3x2x3+5", "inferred")]


def test_a_global_grid_that_fits_wins_over_inference():
    assert _grids({"grid": (3, 3, 2, 0, 5)}) == [("3x3x2+5", "user")]
    assert _grids({"grids": {"attention.0": (1, 6, 3, 5)}}) == [("5+1x6x3", "user")]
    # a per-site grid wins over the global one
    assert _grids({"grid": (3, 3, 2, 0, 5), "grids": {"attention.0": (1, 6, 3, 5)}}) == [("5+1x6x3", "user")]


def test_a_global_grid_that_fits_no_site_is_said_so(caplog):
    with caplog.at_level(logging.WARNING, logger="vsopt"):
        assert _grids({"grid": (2, 4, 4)}) == [("3x2x3+5", "inferred")]  # inference still applies
    (record,) = [r for r in caplog.records if r.name == "vsopt"]
    assert "option 'grid' 2x4x4 has 32 tokens, but no attention site of this graph has that many queries " \
           "(they have [23])" in record.getMessage()
    with pytest.raises(ConfigError, match="option 'grid' 2x4x4 has 32 tokens"):
        _grids({"grid": (2, 4, 4), "strict": True})


def test_a_per_site_grid_of_another_length_is_an_error():
    with pytest.raises(ConfigError, match="has 32 tokens, but the site's queries have 23"):
        _grids({"grids": {"attention.0": (2, 4, 4)}})
