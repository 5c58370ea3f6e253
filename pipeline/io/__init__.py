"""Reading and writing OME-Zarr (NGFF 0.4 and 0.5), local or through fsspec."""

from pipeline.io.ngff import Axis, Level, default_axes
from pipeline.io.read import ImageSource, list_tables, open_image, walk_images
from pipeline.io.write import (
    ImageSink,
    create_collection,
    create_image,
    create_label_image,
    create_labels,
    write_omero,
)

__all__ = [
    "Axis", "Level", "default_axes", "ImageSource", "open_image", "walk_images", "list_tables",
    "ImageSink", "create_collection", "create_image", "create_labels", "create_label_image", "write_omero",
]
