"""Sample data: synthetic stores with ground truth, and real images fetched from PyPI."""

from pipeline.data.fetch import SAMPLES, fetch_sample, load_sample_arrays
from pipeline.data.synthetic import LightsheetModel, make_lightsheet, make_wholeslide

__all__ = ["SAMPLES", "fetch_sample", "load_sample_arrays", "LightsheetModel", "make_lightsheet", "make_wholeslide"]
