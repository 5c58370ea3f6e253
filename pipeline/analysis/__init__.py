"""Scores computed from arrays (no storage): calibration and error detection of uncertainty,
shared by ``tilewise evaluate`` and the benchmarks."""
