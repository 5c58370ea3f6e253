"""A segmentation output as a SpatialData object: its image, labels and table, linked by region.

SpatialData keeps its own on-disk layout (``images/``, ``labels/``, ``tables/`` as AnnData zarr),
which NGFF readers and napari-ome-zarr do not read; tilewise writes NGFF's layout instead and
builds the SpatialData object from it on demand, lazily (dask arrays over the stored levels, no
pixel is read here). ``sdata.write(path)`` then gives SpatialData's layout where one is wanted.
``spatialdata`` is an optional package, imported only here.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.core.errors import InputError, OptionError
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.tables import INSTANCE_KEY, REGION_KEY, read_attributes, to_anndata

IMAGE_ELEMENT = "image"
_SPATIAL = ("z", "y", "x")


def _element(source: ImageSource, kind: str):
    """A SpatialData raster element (a DataTree of every stored level) with the physical
    scale and offset of level 0 as its transformation to the ``global`` coordinate system."""
    import xarray as xr
    from spatialdata.models import (
        Image2DModel,
        Image3DModel,
        Labels2DModel,
        Labels3DModel,
    )
    from spatialdata.transformations import (
        Scale,
        Sequence,
        Translation,
        set_transformation,
    )

    other = [d for d in source.dims if d != "c" and d not in _SPATIAL]
    if other:
        raise OptionError(f"'{source.url}' has axes {other} that SpatialData cannot hold (it knows c, z, y, x); "
                          "read the table with to_anndata, or convert one time point first.")
    spatial = [d for d in source.dims if d in _SPATIAL]
    models = {("image", 2): Image2DModel, ("image", 3): Image3DModel,
              ("labels", 2): Labels2DModel, ("labels", 3): Labels3DModel}
    model = models[(kind, len(spatial))]
    levels = {}
    for i in range(len(source.levels)):
        data, dims = source.dask(i), list(source.dims)
        if kind == "image" and "c" not in dims:  # SpatialData images always have channels
            data, dims = data[None], ["c"] + dims
        coords = {"c": list(source.channel_names)} if kind == "image" and source.channel_names else {}
        levels[f"scale{i}"] = xr.Dataset({"image": xr.DataArray(data, dims=dims, coords=coords)})
    tree = xr.DataTree.from_dict(levels) if len(levels) > 1 else levels["scale0"]["image"]
    level0 = source.level(0)
    index = [source.dims.index(d) for d in spatial]
    steps = [Scale([level0.scale[i] for i in index], axes=tuple(spatial))]
    if any(level0.translation[i] for i in index):
        steps.append(Translation([level0.translation[i] for i in index], axes=tuple(spatial)))
    transform = steps[0] if len(steps) == 1 else Sequence(steps)
    # each level gets level 0's transformation composed with its own down-sampling
    set_transformation(tree, {"global": transform}, set_all=True)
    model().validate(tree)
    return tree


def _labels_source(output_url: str, path: str, storage_options: Mapping[str, Any] | None) -> ImageSource:
    try:
        return open_image(store.join(output_url, path), storage_options)
    except InputError:
        raise InputError(f"'{output_url}' has no labels image at '{path}' for its table; "
                         "was the segmentation run to the end?") from None


def _image_source(output_url: str, labels: ImageSource, storage_options: Mapping[str, Any] | None
                  ) -> ImageSource | None:
    """The image the labels describe: the output root (``--image copy``) or the input it links
    to by a relative path (``--image link``); ``None`` when neither can be opened."""
    link = (labels.image_label or {}).get("source", {}).get("image")
    candidates = [output_url] + ([store.resolve(labels.url, link)] if link else [])
    for url in candidates:
        try:
            return open_image(url, storage_options)
        except InputError:
            continue
    return None


def to_spatialdata(output_url: str, table: str = "nuclei", *, image: bool = True,
                   storage_options: Mapping[str, Any] | None = None):
    """A tilewise segmentation output as ``spatialdata.SpatialData``.

    Elements: the image as ``"image"`` (when ``image`` and it can be found), the labels under
    the table's region name (e.g. ``"nuclei"``), and the table under ``table`` (``<table>_table``
    when that name is taken, SpatialData names being unique: ``"nuclei_table"``), annotating the
    labels (``region``/``label`` columns), so ``spatialdata.get_values`` and
    ``match_table_to_element`` work. All arrays are lazy.
    """
    try:
        import spatialdata as sd
        from spatialdata.models import TableModel
    except ImportError:  # pragma: no cover - optional
        raise OptionError("Reading an output as SpatialData needs the 'spatialdata' package: "
                          "pip install spatialdata.") from None
    attrs = read_attributes(output_url, table, storage_options)
    region = attrs["region"]
    labels = _labels_source(output_url, attrs.get("labels_path", f"labels/{region}"), storage_options)
    adata = to_anndata(output_url, table, storage_options)
    del adata.uns["spatialdata_attrs"]  # TableModel.parse writes its own
    adata.obs[REGION_KEY] = adata.obs[REGION_KEY].astype("category")
    adata.uns["tilewise"] = {k: v for k, v in adata.uns["tilewise"].items() if v is not None}
    parsed = TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    images = {}
    if image:
        source = _image_source(output_url, labels, storage_options)
        if source is not None:
            images[IMAGE_ELEMENT] = _element(source, "image")
    # SpatialData element names are unique across kinds: the table of "nuclei" is "nuclei_table"
    key = table if table not in (region, IMAGE_ELEMENT) else f"{table}_table"
    return sd.SpatialData(images=images, labels={region: _element(labels, "labels")}, tables={key: parsed})
