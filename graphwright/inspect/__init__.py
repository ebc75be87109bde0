"""Inspection: what a compiled graph is and what a recipe changed.

``build_report`` (per-layer table behind ``cm.report()``), ``diff`` (node/state/parameter
changes between two graphs), ``to_networkx`` (analysis) and ``render`` (HTML/SVG picture).
"""

from .diff import GraphDiff, diff
from .networkx import to_networkx
from .render import render
from .report import Report, build_report

__all__ = ["build_report", "Report", "diff", "GraphDiff", "to_networkx", "render"]
