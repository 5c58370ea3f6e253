"""tilewise orchestration: I/O, tiling, scheduling, stitching, pyramids, tables, workflows, CLI."""

__version__ = "0.1.0"
