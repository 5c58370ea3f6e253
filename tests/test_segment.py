"""kernels.segment / kernels.segment_train / kernels.metrics / pipeline.steps.segment and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.metrics import iou_table, match
from kernels.instances import BOUNDARY, INTERIOR, instances_from_probabilities, three_class
from pipeline.io import create_image, create_labels, default_axes, open_image


# --- metrics on hand-made cases -------------------------------------------------------------

def test_metrics_perfect_and_empty():
    truth = np.zeros((10, 10), int)
    truth[1:4, 1:4], truth[6:9, 6:9] = 1, 2
    m = match(truth, truth * 5)[0]  # ids differ, objects identical
    assert (m.tp, m.fp, m.fn) == (2, 0, 0) and m.accuracy == m.f1 == m.panoptic_quality == 1.0
    empty = match(truth, np.zeros_like(truth))[0]
    assert (empty.tp, empty.fp, empty.fn, empty.f1) == (0, 0, 2, 0.0)


def test_metrics_threshold_split_and_false_positive():
    truth = np.zeros((10, 20), int)
    truth[0:10, 0:10] = 1  # 100 px
    pred = np.zeros_like(truth)
    pred[0:10, 0:6] = 7  # IoU 0.6 with object 1
    pred[0:10, 6:10] = 8  # IoU 0.4: the rest of the split
    pred[0:2, 15:20] = 9  # nothing there: a false positive
    t, p, iou = iou_table(truth, pred)
    assert dict(zip(p.tolist(), iou.round(3).tolist())) == {7: 0.6, 8: 0.4}
    at5, at7 = match(truth, pred, thresholds=[0.5, 0.7])
    assert (at5.tp, at5.fp, at5.fn) == (1, 2, 0)
    assert at5.accuracy == pytest.approx(1 / 3) and at5.precision == pytest.approx(1 / 3) and at5.recall == 1.0
    assert at5.f1 == pytest.approx(0.5) and at5.panoptic_quality == pytest.approx(0.6 * 1 / (1 + 1.0))
    assert (at7.tp, at7.fp, at7.fn) == (0, 3, 1)


def test_metrics_hungarian_is_one_to_one():
    truth = np.zeros((4, 12), int)
    truth[:, 0:6], truth[:, 6:12] = 1, 2
    pred = np.zeros_like(truth)
    pred[:, 0:5], pred[:, 5:12] = 3, 4  # object 4 overlaps both; each truth gets one prediction
    m = match(truth, pred, thresholds=[0.5])[0]
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)


# --- targets and post-processing ------------------------------------------------------------

def test_three_class_and_instances_round_trip():
    labels = np.zeros((20, 30), np.int32)
    labels[3:12, 3:14] = 1
    labels[3:12, 14:25] = 2  # touching object 1
    classes = three_class(labels)
    assert (classes[labels == 0] == 0).all()
    assert classes[3, 5] == BOUNDARY and classes[7, 13] == BOUNDARY and classes[7, 14] == BOUNDARY
    assert classes[7, 8] == INTERIOR
    prob = np.stack([(classes == k).astype(np.float32) for k in range(3)])
    inst = instances_from_probabilities(prob, min_size=4)
    assert match(labels, inst, thresholds=[0.9])[0].f1 == 1.0  # touching objects separated again


# --- the trained U-Net path -----------------------------------------------------------------

def blobs_with_labels(shape, n, radius, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    for i in range(1, n + 1):
        centre = [rng.uniform(radius, s - radius) for s in shape]
        r = rng.uniform(0.7, 1.0) * radius
        labels[(sum((g - c) ** 2 for g, c in zip(grids, centre)) <= r * r) & (labels == 0)] = i
    image = ndimage.gaussian_filter((labels > 0).astype(np.float32), 1.0)
    image += rng.normal(0, 0.05, shape).astype(np.float32)
    return np.clip(image * 3000 + 300, 0, 65535).astype(np.uint16), labels


def segmented_blobs(root, client, shape, chunks, scale, n, radius, seed) -> str:
    """``root/img.ome.zarr`` (blobs, their labels ``truth``) segmented by the classical kernel
    into ``root/seg.ome.zarr``: the image copied, with labels/nuclei and tables/nuclei."""
    from pipeline.engine.pyramid import finalize_image
    from pipeline.steps.segment import classical_spec, segment_labels

    ndim = len(shape)
    image, labels = blobs_with_labels(shape, n, radius, seed=seed)
    img = str(root / "img.ome.zarr")
    sink = create_image(img, shape=shape, dtype=np.uint16, axes=default_axes("yx" if ndim == 2 else "zyx"),
                        chunks=chunks, scale=scale, n_levels=1)
    sink.write((slice(None),) * ndim, image)
    lab = create_labels(sink, "truth", n_labels=int(labels.max()))
    lab.write((slice(None),) * ndim, labels)
    finalize_image(lab, client, labels=True, progress=False)
    seg = str(root / "seg.ome.zarr")
    segment_labels(img, seg, classical_spec(img), client, progress=False)
    return seg


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, client):
    from pipeline.engine.pyramid import finalize_image

    path = str(tmp_path_factory.mktemp("seg") / "img.ome.zarr")
    image, labels = blobs_with_labels((96, 112), 30, 7.0, seed=4)
    sink = create_image(path, shape=image.shape, dtype=np.uint16, axes=default_axes("yx"), chunks=(16, 16), n_levels=2)
    sink.write((slice(None), slice(None)), image)
    lab = create_labels(sink, "truth", n_labels=30)
    lab.write((slice(None), slice(None)), labels)
    finalize_image(lab, client, labels=True, progress=False)
    return path, image, labels


@pytest.fixture(scope="module")
def unet_model(annotated, tmp_path_factory):
    from pipeline.steps.train import train_segment

    path, _, _ = annotated
    model = str(tmp_path_factory.mktemp("model") / "seg")
    card = train_segment(path, model, labels="truth", patch=(32, 32), steps=60, batch=4, depth=2, width=8, progress=False)
    return model, card


def test_classical_objects_grow_from_their_cores_to_their_own_edges():
    """A bright and a dim nucleus, blurred as a microscope blurs them: with one threshold the
    bright one swells into its blur (IoU 0.67) and the dim one is cut to its centre (0.65); grown
    from their cores towards the background and trimmed by their own peaks, both fit (>= 0.79)."""
    from scipy import ndimage

    from kernels.contract import BatchContext
    from kernels.segment import ClassicalSegmentKernel

    yy, xx = np.mgrid[:64, :128]
    truth = np.zeros((64, 128), np.int32)
    truth[(yy - 32) ** 2 + (xx - 32) ** 2 <= 12**2] = 1
    truth[(yy - 32) ** 2 + (xx - 90) ** 2 <= 12**2] = 2
    image = (0.05 + ndimage.gaussian_filter(np.where(truth == 1, 0.95, np.where(truth == 2, 0.3, 0.0)), 3.0))
    batch = image[None, None].astype(np.float32)

    def fits(background):
        kernel = ClassicalSegmentKernel(ClassicalSegmentKernel.Params(
            threshold=0.25, background=background, scale=[1.0, 1.0], diameter=24.0))
        labels = kernel(batch, BatchContext.whole(batch))[0, 0]
        assert len(np.unique(labels)) == 3  # two objects
        ious = []
        for t in (1, 2):
            found = labels == np.bincount(labels[truth == t]).argmax()
            ious.append((found & (truth == t)).sum() / (found | (truth == t)).sum())
        return ious

    assert min(fits(0.05)) > 0.75
    assert max(fits(None)) < 0.7  # one level: the threshold alone


def test_training_lowers_validation_loss(unet_model):
    _, card = unet_model
    history = card.training["history"]
    assert card.task == "segment" and card.architecture["out_channels"] == 3
    assert card.validation_loss < 0.8 * history[0]["val_loss"]


def test_low_resolution_augmentation_blurs_a_share_of_patches_and_keeps_their_shape():
    """Training patches seen as if imaged coarser: same shape and level, softer edges (less
    gradient energy); with share 0 nothing changes, and a constant patch stays constant."""
    from kernels.segment_train import degrade_resolution

    rng = np.random.default_rng(0)
    _, labels = blobs_with_labels((12, 32, 32), 6, 5.0, seed=1)
    x = np.stack([(labels > 0).astype(np.float32)[None]] * 6)
    assert np.array_equal(degrade_resolution(x, rng, share=0.0, max_factor=2.5), x)
    y = degrade_resolution(x, np.random.default_rng(3), share=1.0, max_factor=2.5)
    assert y.shape == x.shape and y.dtype == np.float32
    energy = lambda a: sum(np.square(np.diff(a, axis=k)).sum() for k in range(1, a.ndim))  # noqa: E731
    for a, b in zip(x, y):
        assert energy(b) < 0.9 * energy(a)
        assert abs(b.mean() - a.mean()) < 0.1 * a.mean()
    flat = np.full((2, 1, 16, 16), 3.0, np.float32)
    assert np.allclose(degrade_resolution(flat, rng, share=1.0, max_factor=2.5), 3.0)
    some = degrade_resolution(x, np.random.default_rng(5), share=0.5, max_factor=2.5)
    assert 0 < sum(not np.array_equal(a, b) for a, b in zip(x, some)) < len(x)


def _rescaled(tmp_path, name, image, labels, factor):
    from scipy import ndimage

    url = str(tmp_path / f"{name}.ome.zarr")
    img = ndimage.zoom(image.astype(np.float32), factor, order=1)
    sink = create_image(url, shape=img.shape, dtype=np.float32, axes=default_axes("yx"), chunks=(32, 32), n_levels=1)
    sink.write((slice(None), slice(None)), img)
    return url, ndimage.zoom(labels, factor, order=0)


def test_the_card_records_the_training_objects_and_finds_the_zoom_for_other_images(annotated, unet_model, tmp_path):
    """The training objects' diameter (labels and image estimate) is in the card; an image with
    objects three times larger is resampled by about 1/3, the training image not at all."""
    from pipeline.steps.segment import model_zoom

    path, image, labels = annotated
    seen = unet_model[1].training["object_scale"]
    assert 12 <= seen["labels"]["diameter"] <= 16  # blobs of radius 7 px
    assert abs(seen["image"]["diameter"] / seen["labels"]["diameter"] - 1) < 0.25
    assert model_zoom(path, unet_model[0]) == (1.0, None)
    big, _ = _rescaled(tmp_path, "big", image, labels, 3)
    zoom, note = model_zoom(big, unet_model[0])
    assert abs(zoom * 3 - 1) < 0.15 and "resampled" in note and "\n" not in note
    assert model_zoom(big, unet_model[0], diameter=seen["image"]["diameter"]) == (1.0, None)  # --diameter wins


def test_a_given_diameter_is_compared_with_the_training_labels_measure(annotated, unet_model, tmp_path):
    """--diameter is a measure, so the zoom compares it with the labels' measure of the training
    objects, not with the estimate on the training image (which may be off: it was +39 % on a
    crowded 3D sample); without it the two estimates are compared."""
    from pipeline.steps.segment import model_zoom

    path, image, labels = annotated
    seen = unet_model[1].training["object_scale"]
    measured, estimated = seen["labels"]["diameter"], seen["image"]["diameter"]
    assert measured != estimated
    big, _ = _rescaled(tmp_path, "big", image, labels, 3)
    zoom, _ = model_zoom(big, unet_model[0], diameter=3 * measured)
    assert zoom == round(1 / 3, 3)
    zoom, _ = model_zoom(big, unet_model[0], diameter=3 * estimated)
    assert zoom == round(measured / (3 * estimated), 3) != round(1 / 3, 3)


def test_a_training_estimate_off_its_labels_gives_way_to_their_measure(annotated, unet_model, tmp_path):
    """Where the estimate on the training image missed its labels by more than the estimates'
    own error, the zoom compares this image's estimate with the labels' measure instead."""
    import json
    import shutil

    from pipeline.steps.segment import model_zoom

    path, image, labels = annotated
    big, _ = _rescaled(tmp_path, "big", image, labels, 3)
    seen = unet_model[1].training["object_scale"]
    measured = seen["labels"]["diameter"]
    model = tmp_path / "off"
    shutil.copytree(unet_model[0], model)
    card = json.loads((model / "card.json").read_text())
    card["training"]["object_scale"]["image"]["diameter"] = 1.6 * measured  # the estimate 60 % too high
    (model / "card.json").write_text(json.dumps(card))
    zoom_ok, _ = model_zoom(big, unet_model[0])
    zoom, note = model_zoom(big, str(model))
    assert abs(zoom - zoom_ok * measured / seen["image"]["diameter"]) <= 0.002 and abs(zoom * 3 - 1) < 0.2
    assert "+60 % off its labels, so their measure is used" in note


def test_an_estimate_far_from_the_training_labels_is_a_one_line_warning(annotated, client, tmp_path, caplog):
    """Training records the labels' measure and the image's estimate; where they differ by more
    than the estimates' own error the user is told once, in one line naming the remedy."""
    import logging

    from kernels.objectscale import estimate_error
    from pipeline.engine.pyramid import finalize_image
    from pipeline.steps.train import training_object_scale

    assert estimate_error(10.0, 12.0) is None and estimate_error(10.0, None) is None
    assert estimate_error(10.0, 13.9) == pytest.approx(0.39)
    assert estimate_error(10.0, 7.0) == pytest.approx(-0.3)
    path, image, labels = annotated
    url = str(tmp_path / "small.ome.zarr")
    sink = create_image(url, shape=image.shape, dtype=np.uint16, axes=default_axes("yx"), chunks=(16, 16), n_levels=1)
    sink.write((slice(None), slice(None)), image)
    # the same objects, labelled as discs of radius 3 px about their centres: a measure ~2x smaller
    yy, xx = np.indices(labels.shape)
    small = np.zeros_like(labels)
    for i in range(1, labels.max() + 1):
        cy, cx = np.argwhere(labels == i).mean(axis=0)
        small[((yy - cy) ** 2 + (xx - cx) ** 2 <= 9) & (labels == i)] = i
    for name, lab in (("truth", labels), ("small", small)):
        sink_l = create_labels(sink, name, n_labels=int(labels.max()))
        sink_l.write((slice(None), slice(None)), lab)
        finalize_image(sink_l, client, labels=True, progress=False)
    source = open_image(url)
    with caplog.at_level(logging.WARNING, logger="pipeline.steps.train"):
        training_object_scale(source, source.label("truth"), 0)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pipeline.steps.train"):
        found = training_object_scale(source, source.label("small"), 0)
    (record,) = caplog.records
    message = record.getMessage()
    assert "--diameter" in message and "\n" not in message and "labels measure" in message
    assert found["image"]["diameter"] > 1.5 * found["labels"]["diameter"]


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_unet_at_its_training_scale_keeps_its_accuracy_and_tiles_agree(annotated, unet_model, client, tmp_path,
                                                                       factor):
    """The same image rescaled x0.5 and x2: with tiles resampled to the model's scale, accuracy
    at IoU 0.5 stays within 0.1 of the original's, and tiled equals untiled object for object."""
    from kernels.metrics import summary
    from pipeline.steps.segment import model_spec, model_zoom, segment_labels

    path, image, labels = annotated
    model = unet_model[0]
    base = segment_labels(path, str(tmp_path / "base.ome.zarr"), model_spec(model), client, tile_shape=(32, 32),
                          progress=False, table=False, image="link")
    acc = summary(labels, open_image(base.labels).read((slice(None),) * 2))["0.50"]["accuracy"]
    url, truth = _rescaled(tmp_path, "scaled", image, labels, factor)
    zoom, _ = model_zoom(url, model)
    assert 0.6 < zoom * factor < 1.4, zoom  # small blurred blobs are estimated smaller than drawn
    spec = model_spec(model, zoom=zoom)
    tiled = segment_labels(url, str(tmp_path / "t.ome.zarr"), spec, client, tile_shape=(32, 32), progress=False,
                           table=False, image="link")
    whole = segment_labels(url, str(tmp_path / "w.ome.zarr"), spec, client, tile_shape=truth.shape, progress=False,
                           table=False, image="link")
    got = open_image(tiled.labels).read((slice(None),) * 2)
    assert tiled.tiles >= 4 and whole.tiles == 1
    assert match(open_image(whole.labels).read((slice(None),) * 2), got, thresholds=[0.5])[0].f1 >= 0.99
    scaled_acc = summary(truth, got)["0.50"]["accuracy"]
    assert scaled_acc >= acc - 0.1, (acc, scaled_acc)


def test_unet_tiled_equals_untiled(annotated, unet_model, client, tmp_path):
    from pipeline.steps.segment import model_spec, segment_labels

    path, image, _ = annotated
    spec = model_spec(unet_model[0])
    tiled = segment_labels(path, str(tmp_path / "t.ome.zarr"), spec, client, tile_shape=(32, 32), progress=False)
    whole = segment_labels(path, str(tmp_path / "w.ome.zarr"), spec, client, tile_shape=image.shape, progress=False)
    assert tiled.tiles >= 9 and whole.tiles == 1
    a = open_image(whole.labels).read((slice(None), slice(None)))
    b = open_image(tiled.labels).read((slice(None), slice(None)))
    assert whole.objects > 0
    assert match(a, b, thresholds=[0.5])[0].f1 >= 0.99


def test_unet_sees_mirrored_edges_and_labels_only_the_volume(annotated, unet_model):
    """A zero margin past the edge reads as foreground to a network trained on image content;
    the U-Net kernel asks for a mirrored edge and labels nothing outside the valid region."""
    from kernels import BatchContext, build_kernel
    from pipeline.engine.runner import EngineOptions, prepare_engine
    from pipeline.steps.segment import model_spec

    path, _, _ = annotated
    setup = prepare_engine(path, model_spec(unet_model[0]), EngineOptions())
    assert setup.plan.pad_mode == "reflect" and setup.params["pad_mode"] == "reflect"
    kernel = build_kernel(model_spec(unet_model[0], min_size=0))
    kernel.load("cpu")
    block = setup.scaling.apply(open_image(path).read((slice(None), slice(None)))[None])
    padded = np.pad(block, ((0, 0), (8, 8), (8, 8)), mode="reflect")[None]
    valid = (slice(8, 8 + block.shape[1]), slice(8, 8 + block.shape[2]))
    free = kernel.run(padded)[0, 0]  # every pixel declared valid
    masked = kernel(padded, BatchContext((valid,), ((-8, -8),)))[0, 0]
    outside = np.ones(masked.shape, bool)
    outside[valid] = False
    assert (free[outside] > 0).any()  # without the valid region, mirrored objects are labelled
    assert not (masked[outside] > 0).any()
    assert (masked[valid] > 0).any()


def test_cli_train_and_segment(annotated, tmp_path):
    from pipeline.cli import main
    from pipeline.io.tables import read_table

    path, _, labels = annotated
    model = str(tmp_path / "m")
    assert main(["-q", "train", "segment", path, model, "--labels", "truth", "--patch", "32,32", "--steps", "20",
                 "--batch", "2", "--depth", "2", "--width", "8"]) == 0
    out = str(tmp_path / "o.ome.zarr")
    assert main(["-q", "segment", path, out, "--model", model, "--tile", "32,32", "--workers", "1"]) == 0
    assert main(["-q", "segment", path, out, "--model", model, "--tile", "32,32", "--workers", "1"]) == 0  # resume: done
    out2 = str(tmp_path / "c.ome.zarr")
    assert main(["-q", "segment", path, out2, "--classical", "--min-distance", "6", "--workers", "1"]) == 0
    table = read_table(out2, "nuclei")
    assert len(table) >= 15 and table["voxels"].sum() > 0.5 * (labels > 0).sum()


def test_cli_refuses_wrong_model_and_missing_labels(annotated, tmp_path, capsys):
    from pipeline.cli import main

    path, _, _ = annotated
    assert main(["-q", "train", "segment", path, str(tmp_path / "m"), "--labels", "nope", "--steps", "1"]) == 2
    assert "has no labels 'nope'" in capsys.readouterr().err
    assert main(["-q", "segment", path, str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "not a tilewise model folder" in capsys.readouterr().err


def test_unet_3d_anisotropic_tiled_equals_untiled(tmp_path, client):
    """3D: z pixels 2x coarser, so the U-Net keeps z at full resolution (pool 1 on z)."""
    from pipeline.engine.pyramid import finalize_image
    from pipeline.steps.segment import model_spec, segment_labels
    from pipeline.steps.train import train_segment

    image, labels = blobs_with_labels((20, 48, 40), 12, 6.0, seed=9)
    path = str(tmp_path / "vol.ome.zarr")
    sink = create_image(path, shape=image.shape, dtype=np.uint16, axes=default_axes("zyx"), chunks=(8, 16, 16),
                        scale=(2.0, 1.0, 1.0), n_levels=1)
    sink.write((slice(None),) * 3, image)
    lab = create_labels(sink, "truth")
    lab.write((slice(None),) * 3, labels)
    finalize_image(lab, client, labels=True, progress=False)
    model = str(tmp_path / "m3")
    card = train_segment(path, model, labels="truth", patch=(8, 16, 16), steps=80, batch=4, depth=2, width=8, progress=False)
    assert card.architecture["pool"] == [1, 2, 2]
    spec = model_spec(model)
    tiled = segment_labels(path, str(tmp_path / "t.ome.zarr"), spec, client, tile_shape=(8, 16, 16), progress=False)
    whole = segment_labels(path, str(tmp_path / "w.ome.zarr"), spec, client, tile_shape=image.shape, progress=False)
    assert tiled.tiles >= 8 and whole.tiles == 1
    a = open_image(whole.labels).read((slice(None),) * 3)
    b = open_image(tiled.labels).read((slice(None),) * 3)
    assert whole.objects > 0
    assert match(a, b, thresholds=[0.5])[0].f1 >= 0.99
