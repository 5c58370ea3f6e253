"""The ``tilewise`` command line. Turns :class:`TilewiseError` into a one-line message, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from pipeline.core.errors import OptionError, TilewiseError

log = logging.getLogger("tilewise")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,256,256, got '{text}'") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,0.4,0.4, got '{text}'") from None


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a local cluster, one worker process per core)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (tcp://host:8786)")
    g.add_argument("--scheduler-file", metavar="FILE", help="scheduler file written by `dask scheduler` / dask-jobqueue")
    g.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster")
    g.add_argument("--gpu-tiles", type=int, metavar="N", default=None,
                   help="tiles in flight per GPU on the local cluster (default 4; fewer on small GPUs)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--ngff", choices=("0.5", "0.4"), default="0.5", help="NGFF version to write (default 0.5)")


@contextmanager
def _client(args) -> Iterator[Any]:
    """Connect as the options say and print the dashboard link, where progress can be watched."""
    from pipeline.engine.cluster import GPU_TILES_IN_FLIGHT, connect

    if args.gpu_tiles is not None and args.gpu_tiles < 1:
        raise OptionError(f"--gpu-tiles must be at least 1, got {args.gpu_tiles}.")
    with connect(scheduler=args.scheduler, scheduler_file=args.scheduler_file, n_workers=args.workers,
                 gpu_tiles=args.gpu_tiles or GPU_TILES_IN_FLIGHT) as client:
        if not args.quiet:
            workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            print(f"dask: {workers} workers, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client


def cmd_run(args) -> None:
    from pipeline.workflow import dump_workflow, load_workflow, run_workflow

    workflow = load_workflow(args.workflow)
    if args.check:
        print(dump_workflow(workflow), end="")
        return
    if not args.input or not args.output:
        raise OptionError("tilewise run WORKFLOW INPUT OUTPUT: give the input image and the output store "
                          "(or --check to validate the workflow only).")
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    with _client(args) as client:
        summary = run_workflow(workflow, args.input, args.output, client, overwrite=args.overwrite,
                               progress=not args.quiet, on_step=say)
    print(f"wrote {summary.output} ({len(summary.steps)} steps, {summary.seconds:.0f} s)")
    for name, done in summary.steps.items():
        report = done.get("summary", {}).get("report")
        if report:
            print(f"report: {report}")
    print(f"view: napari --plugin napari-ome-zarr {summary.output}")


def cmd_info(args) -> None:
    from pipeline.info import describe

    print(describe(args.store))


def cmd_sample(args) -> None:
    from pipeline.io import store

    if not args.overwrite:  # refuse an existing output before starting a cluster
        store.prepare_output(args.out, False)
    with _client(args) as client:
        progress = not args.quiet
        if args.name == "lightsheet":
            from pipeline.data import make_lightsheet

            make_lightsheet(args.out, client, shape=args.shape or (96, 512, 512), seed=args.seed,
                            chunks=args.chunks, version=args.ngff, overwrite=args.overwrite, progress=progress)
        elif args.name == "wholeslide":
            from pipeline.data import make_wholeslide

            make_wholeslide(args.out, client, shape=args.shape or (4096, 4096), seed=args.seed,
                            chunks=args.chunks, version=args.ngff, overwrite=args.overwrite, progress=progress)
        else:
            from pipeline.data import fetch_sample

            if args.shape:
                raise OptionError(f"--shape applies to synthetic samples; '{args.name}' is a real image of fixed size.")
            fetch_sample(args.name, args.out, client, overwrite=args.overwrite, version=args.ngff, progress=progress)
    print(f"wrote {args.out}")


def cmd_convert(args) -> None:
    from pipeline.io import store
    from pipeline.steps.convert import convert

    if not args.overwrite:  # refuse an existing output before starting a cluster
        store.prepare_output(args.output, False)
    with _client(args) as client:
        convert(args.input, args.output, client, axes=args.axes, scale=args.scale, chunks=args.chunks,
                shards=args.shards, version=args.ngff, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {args.output}")


def cmd_run_kernel(args) -> None:
    from kernels import KernelSpec
    from pipeline.io import open_image
    from pipeline.engine.runner import build_checked
    from pipeline.steps.apply import run_kernel

    source = open_image(args.input)  # validate the input before starting a cluster
    ndim = len(source.spatial_dims)
    if args.kernel == "gaussian":
        sigma = args.sigma or (1.0,) * ndim
        if len(sigma) == 1:
            sigma = sigma * ndim
        spec = KernelSpec.of("gaussian", sigma=list(sigma), channels=source.n_channels)
    elif args.kernel == "identity":
        spec = KernelSpec.of("identity", ndim=ndim, channels=source.n_channels)
    else:
        spec = KernelSpec.of("convnet", ndim=ndim, in_channels=source.n_channels, out_channels=args.out_channels,
                             width=args.width, depth=args.depth, seed=args.seed)
    build_checked(spec)  # a bad parameter is an error before a cluster starts
    with _client(args) as client:
        summary = run_kernel(args.input, args.output, spec, client, _engine_options(args, ndim), out_dtype=args.dtype)
    print(f"wrote {args.output}: {summary.computed} tiles computed, {summary.skipped} already "
          f"done, {summary.voxels_per_s / 1e6:.2f} Mvox/s{_outside_note(summary.outside, summary.tiles)}")


def cmd_train_denoise(args) -> None:
    from pipeline.steps.train import train_denoise

    card = train_denoise(args.input, args.model, method=args.method, target=args.target, loss=args.loss,
                         patch=args.patch, steps=args.steps,
                         batch=args.batch, level=args.level, depth=args.depth, width=args.width,
                         mask_fraction=args.mask_fraction, seed=args.seed, uncertainty=args.uncertainty,
                         samples=args.samples, members=args.members, overwrite=args.overwrite,
                         progress=not args.quiet, resume=args.resume)
    print(f"wrote {args.model}: {card.method}{_uncertainty_note(card)}, validation loss {card.validation_loss:.5f}, "
          f"{card.training['seconds']:.0f} s, weights {card.weights_sha256[:12]}{_posterior_note(card)}")


def _posterior_note(card) -> str:
    """The posterior step training chose (``kernels.posterior.choose``), for the summary line."""
    if not card.posterior or "choice" not in card.posterior.get("tta", {}):
        return ""
    plain, tta = card.posterior["plain"]["choice"], card.posterior["tta"]["choice"]
    note = f"; posterior step by estimated risk: {', '.join(tta)}"
    return note if plain == tta else f"{note} ({', '.join(plain)} without TTA)"


def cmd_denoise(args) -> None:
    from pipeline.steps.denoise import denoise
    from pipeline.io import open_image

    from kernels.posterior import CHOICES  # checked here, not in the parser: importing kernels costs every command 0.5 s

    if args.posterior not in ("auto", *CHOICES):
        raise OptionError(f"--posterior must be auto or one of {', '.join(CHOICES)}, got '{args.posterior}'.")
    source = open_image(args.input)
    with _client(args) as client:
        summary, report = denoise(args.input, args.output, args.model, client,
                                  _engine_options(args, len(source.spatial_dims)), out_dtype=args.dtype,
                                  precision=args.precision, tta=args.tta, posterior=args.posterior)
    print(f"wrote {args.output}: {summary.computed} tiles computed, {summary.skipped} already "
          f"done, {summary.voxels_per_s / 1e6:.2f} Mvox/s{_outside_note(summary.outside, summary.tiles)}; residual std {report.residual_std_median:.4f} "
          f"(normalised), {len(report.flagged)} tiles flagged")


def cmd_train_segment(args) -> None:
    from pipeline.steps.train import train_segment

    card = train_segment(args.image, args.model, labels=args.labels, patch=args.patch, steps=args.steps, batch=args.batch,
                         level=args.level, depth=args.depth, width=args.width, seed=args.seed,
                         uncertainty=args.uncertainty, samples=args.samples, members=args.members,
                         overwrite=args.overwrite, progress=not args.quiet, resume=args.resume)
    print(f"wrote {args.model}: 3-class U-Net{_uncertainty_note(card)}, validation loss {card.validation_loss:.4f}, "
          f"{card.training['seconds']:.0f} s, weights {card.weights_sha256[:12]}")


def _uncertainty_note(card) -> str:
    u = card.uncertainty
    if not u:
        return ""
    detail = {"mc-dropout": f", {u['samples']} samples", "ensemble": f", {u['members']} members"}.get(u["method"], "")
    return f" ({u['method']}{detail})"


def cmd_embed(args) -> None:
    from pipeline.io import open_image
    from pipeline.steps.embed import embed_objects, embed_patches

    if (args.labels is None) == (not args.patches):
        raise OptionError("Give either --labels NAME (embed its objects) or --patches (a grid of patches).")
    source = open_image(args.input)  # validate before a cluster starts
    if args.labels:
        source.label(args.labels)
    settings = dict(model=args.model, seeds=args.seeds, tile_shape=args.tile, overwrite=args.overwrite,
                    progress=not args.quiet)
    with _client(args) as client:
        if args.patches:
            summary = embed_patches(args.input, args.output, client, patch=args.crop, **settings)
        else:
            summary = embed_objects(args.input, args.output, client, labels=args.labels, table=args.table,
                                    crop=args.crop, **settings)
    kinds = ", ".join(f"{k} ({d})" for k, d in summary.embeddings.items())
    print(f"wrote {summary.table}: {summary.objects} objects, {summary.objects_per_s:.0f} objects/s; {kinds}")


def cmd_explain(args) -> None:
    from pipeline.io import open_image
    from pipeline.steps.explain import explain

    open_image(args.input)  # validate before a cluster starts
    objects = None
    if args.objects is not None:
        objects = "all" if args.objects == "all" else _ints(args.objects)
    with _client(args) as client:
        summary = explain(args.input, args.output, client, model=args.model, method=args.method, objects=objects,
                          region=args.region, labels=args.labels, table=args.table, steps=args.steps,
                          baseline=args.baseline, window=args.window, stride=args.stride, level=args.gradcam_level,
                          panels=args.panels, tile_shape=args.tile, overwrite=args.overwrite,
                          progress=not args.quiet)
    check = (f"; IG completeness error at most {summary.completeness_error_max:.2g}"
             if summary.completeness_error_max is not None else "")
    print(f"wrote {summary.image} and {summary.table}: {summary.targets} targets, "
          f"{summary.seconds_per_target:.2f} s per target, {len(summary.panels)} panels{check}")


def cmd_analyze(args) -> None:
    from pipeline.steps.analyze import analyze

    result = analyze(args.table, group_by=args.group_by, out=args.out, null_size=args.null_size)
    for kind, s in result["scores"].items():
        print(f"{kind:>16}: mAP {s['map']:.3f} (p {s['map_p']:.3g})  1-NN {s['knn_acc']:.3f}  probe {s['probe_acc']:.3f}")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")


def cmd_normalize_stain(args) -> None:
    from pipeline.io import open_image
    from pipeline.steps.stain import normalize_stain

    source = open_image(args.input)
    with _client(args) as client:
        summary = normalize_stain(args.input, args.output, client, _engine_options(args, len(source.spatial_dims)),
                                  reference=args.reference, white=args.white)
    print(f"wrote {args.output}: {summary.computed} tiles computed, {summary.skipped} already done"
          f"{_outside_note(summary.outside, summary.tiles)}")


def cmd_export_geojson(args) -> None:
    from pipeline.steps.geojson import export_geojson

    with _client(args) as client:
        summary = export_geojson(args.output, args.geojson, client, name=args.name, classification=args.classification,
                                 overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {summary.path}: {summary.features} polygons ({summary.seconds:.1f} s); in QuPath: File > Import "
          "objects from file")


def cmd_evaluate(args) -> None:
    from pipeline.steps.evaluate import evaluate

    scores = evaluate(args.output, args.truth, labels=args.name, report=args.report)
    shown = {k: scores[k] for k in ("dice", "iou", "acc50", "ece", "auroc", "auroc_by_map", "error_rate")}
    print(json.dumps(shown, indent=2))
    for note in scores["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.report:
        print(f"wrote {args.report}/evaluation.json" + (" and reliability.png" if scores.get("reliability_png") else ""))


def cmd_segment(args) -> None:
    from pipeline.io import open_image
    from pipeline.steps.segment import classical_spec, model_spec, model_zoom, segment_labels

    source = open_image(args.input)  # validate the input (and the model) before starting a cluster
    ndim = len(source.spatial_dims)
    if args.model:
        spec = model_spec(args.model, min_size=args.min_size, samples=args.samples, precision=args.precision,
                          input_variance=args.input_variance)  # checks the model folder first
        zoom, note = model_zoom(args.input, args.model, level=args.level, diameter=args.diameter)
        if note and args.no_rescale and zoom != 1.0:
            print(f"warning: {note.split(': tiles')[0]}; --no-rescale keeps the image's scale, results may be "
                  "poor", file=sys.stderr)
        elif note:
            print(f"note: {note}", file=sys.stderr)
        if zoom != 1.0 and not args.no_rescale:
            spec = model_spec(args.model, min_size=args.min_size, zoom=zoom, samples=args.samples,
                              precision=args.precision, input_variance=args.input_variance)
    else:
        halo = None
        if args.halo:
            halo = args.halo * ndim if len(args.halo) == 1 else args.halo
            if len(halo) != ndim:
                raise OptionError(f"--halo needs one size or {ndim} sizes (one per spatial axis), got {args.halo}.")
        spec = classical_spec(args.input, level=args.level, diameter=args.diameter, sigma=args.sigma,
                              min_distance=args.min_distance, min_size=args.min_size, halo=halo,
                              threshold=args.threshold, polarity=args.polarity, stain=args.stain)
        scale = spec.params.get("object_scale")
        if scale and not args.quiet:
            from kernels.objectscale import ObjectScale

            print(f"object diameter: {ObjectScale(**scale).describe()}")
        if not args.quiet:
            what = ("the haematoxylin channel (H&E)" if spec.params["stain"] == "hematoxylin" else
                    f"{'dark' if spec.params['polarity'] == 'dark' else 'bright'} objects")
            print(f"objects: {what}, threshold {spec.params['threshold']:.4g} (--polarity/--stain to choose)")
    with _client(args) as client:
        summary = segment_labels(args.input, args.output, spec, client, name=args.name, iou=args.iou, image=args.image,
                                 consecutive=not args.sparse_ids, table=not args.no_table, level=args.level,
                                 tile_shape=args.tile, batch=args.batch, overwrite=args.overwrite,
                                 progress=not args.quiet, ngff=args.ngff, missing_chunks=args.missing_chunks,
                                 foreground=_foreground(args))
    print(f"wrote {summary.labels}: {summary.objects} objects ({summary.stitched_objects} stitched across "
          f"{summary.tiles} tiles)" + (f", table {summary.table}" if summary.table else "")
          + _outside_note(summary.outside, summary.tiles))
    if summary.halo_edge_objects:
        print(f"note: {summary.halo_edge_objects} objects reached the edge of a tile's halo; raise --halo if objects "
              "are that large", file=sys.stderr)


def _add_training_options(p: argparse.ArgumentParser, default_patch: str, *, batch: int, depth: int,
                          steps: int = 2000, width: int = 32) -> None:
    p.add_argument("--patch", type=_ints, help=f"patch shape over the spatial axes (default {default_patch})")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"training steps at most (default {steps}; early stopping may end sooner)")
    p.add_argument("--batch", type=int, default=batch, help=f"patches per step (default {batch})")
    p.add_argument("--level", type=int, default=0, help="pyramid level to train on")
    p.add_argument("--depth", type=int, default=depth, help=f"U-Net down-sampling steps (default {depth})")
    p.add_argument("--width", type=int, default=width, help=f"U-Net channels at the top level (default {width})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from the checkpoint in the model folder (saved at every "
                        "validation); same options as the interrupted run")
    g = p.add_argument_group("uncertainty")
    g.add_argument("--uncertainty", choices=("adf", "mc-dropout", "ensemble"),
                   help="also estimate per-pixel uncertainty: adf (one pass, moment propagation; segment only), "
                        "mc-dropout (dropout kept on at inference, --samples passes) or ensemble (--members "
                        "networks, trained one after the other)")
    g.add_argument("--samples", type=int, help="mc-dropout: forward passes at inference (default 20)")
    g.add_argument("--members", type=int, help="ensemble: networks (default 5)")


def _add_precision_option(p) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="run the network under autocast in this dtype (default fp32; bf16/fp16 are faster on GPUs "
                        "and recent CPUs, at an accuracy cost stated in the README; recorded in the manifest)")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiling")
    g.add_argument("--level", type=int, default=0, help="input pyramid level (default 0)")
    g.add_argument("--tile", type=_ints, help="tile core shape over the spatial axes (rounded to chunks)")
    g.add_argument("--batch", type=int, default=1, help="tiles per task, stacked into one model call (GPU: 2-8)")
    g.add_argument("--pad-mode", choices=("reflect", "symmetric", "edge", "constant"),
                   help="how the halo is filled past the volume edge (default: the kernel's own, e.g. reflect)")
    g.add_argument("--blend", type=_ints, metavar="WINDOW",
                   help="weight-blend model windows of this size (per spatial axis) instead of crop-stitching halos")
    g.add_argument("--blend-overlap", type=float, default=0.25, help="overlap of blend windows (default 0.25)")
    g.add_argument("--dtype", default="float32", help="output dtype: float32 (default), input, uint16, ...")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
    g.add_argument("--ngff", choices=("0.4", "0.5"), help="NGFF version to write (default: the input's)")
    _add_missing_option(g)
    _add_foreground_options(g)


def _add_foreground_options(g) -> None:
    g.add_argument("--tissue", action="store_true",
                   help="detect the tissue of a slide once (written as OUT/labels/tissue) and compute only the tiles "
                        "that hold some; glass stays empty")
    g.add_argument("--mask", metavar="URL",
                   help="compute only the tiles a low-resolution mask keeps (a labels image, nonzero = keep)")


def _foreground(args) -> str | None:
    from pipeline.steps.tissue import foreground_option

    return foreground_option(args.tissue, args.mask)


def _outside_note(outside: int, tiles: int) -> str:
    return f"; {outside} of {tiles} tiles outside the tissue/mask skipped ({100 * outside / max(tiles, 1):.0f}%)" \
        if outside else ""


def _add_missing_option(g) -> None:
    g.add_argument("--missing-chunks", choices=("fill", "error"), default="fill",
                   help="an input chunk the store lacks: read as the fill value and reported (default; zarr leaves "
                        "out empty chunks), or refuse it (stores known to be complete)")


def _engine_options(args, ndim: int):
    from pipeline.engine.runner import Blend, EngineOptions

    blend = None
    if args.blend:
        window = args.blend * ndim if len(args.blend) == 1 else args.blend
        if len(window) != ndim:
            raise OptionError(f"--blend needs one size or {ndim} sizes (one per spatial axis), got {args.blend}.")
        blend = Blend(tuple(window), args.blend_overlap)
    return EngineOptions.of(level=args.level, tile_shape=args.tile, batch=args.batch, pad_mode=args.pad_mode,
                            blend=blend, overwrite=args.overwrite, progress=not args.quiet, ngff=args.ngff,
                            missing_chunks=args.missing_chunks, foreground=_foreground(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilewise", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors: no progress, notes or warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show images, levels, chunks, labels and tables of a store",
                       description="Print the tree of an OME-Zarr store: images, levels (shape, chunks, dtype, "
                                   "scale), labels and tables.")
    p.add_argument("store", help="path or fsspec URL of an OME-Zarr store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="write a sample store (synthetic or real)",
                       description="Write a sample OME-Zarr store: 'lightsheet' (synthetic 3D nuclei with clean "
                                   "image, labels and classes), 'wholeslide' (synthetic RGB H&E-like slide), "
                                   "'dsb2018' (real nuclei + manual labels) or 'he' (real H&E), the real ones "
                                   "fetched from the stardist wheel on PyPI.")
    p.add_argument("name", choices=("lightsheet", "wholeslide", "dsb2018", "he", "nuclei3d"))
    p.add_argument("out", help="output store path")
    p.add_argument("--shape", type=_ints, help="image shape, e.g. 96,512,512 (lightsheet) or 4096,4096 (wholeslide)")
    p.add_argument("--chunks", type=_ints, help="chunk shape (default 64,256,256 in 3D, 1024,1024 in 2D)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same store)")
    _add_output_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert", help="convert TIFF, a plain zarr array or OME-Zarr 0.4/0.5 to OME-Zarr",
                       description="Stream a TIFF file, a plain zarr array or an OME-Zarr image into an NGFF "
                                   "image, chunk by chunk, with a pyramid. The input is never modified.")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--axes", help="axis names of the input in order, e.g. zyx or czyx (needed for TIFF/zarr arrays)")
    p.add_argument("--scale", type=_floats, help="pixel size per axis (or per spatial axis), e.g. 2,0.4,0.4")
    p.add_argument("--chunks", type=_ints, help="output chunk shape")
    p.add_argument("--shards", type=_ints, help="output shard shape (NGFF 0.5 only), a multiple of --chunks")
    _add_output_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("run-kernel", help="run a built-in kernel tile by tile (gaussian, convnet, identity)",
                       description="Run a kernel over an image through the tiled engine: chunk-aligned tiles read "
                                   "with a halo covering the kernel's receptive field, crop-stitched, resumable "
                                   "(re-run the same command after an interruption).")
    p.add_argument("kernel", choices=("gaussian", "convnet", "identity"))
    p.add_argument("input", help="OME-Zarr image, or a slide file (SVS, NDPI, tiled or OME-TIFF)")
    p.add_argument("output", help="output image (an OME-Zarr store; the image is its root)")
    p.add_argument("--sigma", type=_floats, help="gaussian: sigma in pixels, one value or one per spatial axis")
    p.add_argument("--depth", type=int, default=4, help="convnet: number of 3-wide conv layers (halo = depth)")
    p.add_argument("--width", type=int, default=16, help="convnet: channels of the hidden layers")
    p.add_argument("--out-channels", type=int, default=1, help="convnet: output channels")
    p.add_argument("--seed", type=int, default=0, help="convnet: weight seed")
    _add_engine_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_run_kernel)

    p = sub.add_parser("train", help="train a model on an image (denoise, segment)",
                       description="Train a model from the data itself and write a model folder "
                                   "(weights.pt + card.json).")
    train = p.add_subparsers(dest="task", required=True, metavar="TASK")
    p = train.add_parser("denoise", help="denoiser: self-supervised (N2V2, Noise2Self) on the noisy image, or "
                                         "supervised on pairs (CARE, Noise2Noise)",
                         description="Train a denoiser on patches drawn from random blocks of the image: a blind-spot "
                                     "network on the noisy image alone (n2v2, n2s: no clean data needed), or a U-Net "
                                     "on pairs cropped at identical places (care: --target is a clean or "
                                     "high-exposure image; n2n: --target is a second noisy acquisition).")
    p.add_argument("input", help="OME-Zarr image, or a slide file (SVS, NDPI, tiled or OME-TIFF)")
    p.add_argument("model", help="model folder to write")
    p.add_argument("--method", choices=("n2v2", "n2s", "care", "n2n"), default="n2v2",
                   help="n2v2 (default), n2s (Noise2Self), care or n2n (both need --target)")
    p.add_argument("--target", help="care: the clean / high-exposure image; n2n: a second noisy image of the same "
                                    "field (same axes, shape and pixel size)")
    p.add_argument("--loss", choices=("mse", "mae"), default="mse",
                   help="care: squared (default) or absolute error; n2n needs mse")
    _add_training_options(p, "64,64 or 16,64,64", batch=16, depth=2, steps=4000, width=16)
    p.add_argument("--mask-fraction", type=float, help="n2v2: share of pixels masked per patch (default 0.1)")
    p.set_defaults(func=cmd_train_denoise)

    p = train.add_parser("segment", help="3-class U-Net (background/interior/boundary) from annotated labels",
                         description="Train a 3-class segmentation U-Net on an image and its labels group "
                                     "(IMAGE/labels/NAME), with a held-out validation split and early stopping.")
    p.add_argument("image", help="OME-Zarr image with a labels group")
    p.add_argument("model", help="model folder to write")
    p.add_argument("--labels", required=True, metavar="NAME", help="labels image under IMAGE/labels/")
    _add_training_options(p, "128,128 or 32,64,64; 16,64,64 if z is coarse", batch=8, depth=3)
    p.set_defaults(func=cmd_train_segment)

    p = sub.add_parser("segment", help="instance segmentation with globally stitched labels and an object table",
                       description="Segment an image tile by tile (a trained U-Net, or the classical "
                                   "threshold + watershed kernel), stitch objects across tiles into one labels "
                                   "image OUTPUT/labels/NAME (with a pyramid) inside a copy of the input image, "
                                   "and write OUTPUT/tables/NAME. "
                                   "Resumable: re-run the same command after an interruption.")
    p.add_argument("input", help="OME-Zarr image, or a slide file (SVS, NDPI, tiled or OME-TIFF)")
    p.add_argument("output", help="output store")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--model", help="model folder from `tilewise train segment`")
    how.add_argument("--classical", action="store_true",
                     help="smoothing + Otsu threshold + distance watershed of the cores, grown to each object's edge "
                          "(H&E: the haematoxylin cores as they are)")
    p.add_argument("--name", default="nuclei", help="labels and table name (default nuclei)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU inside the tile overlap that makes two pieces one object")
    p.add_argument("--sparse-ids", action="store_true", help="keep tile-packed uint64 ids instead of 1..N")
    p.add_argument("--no-table", action="store_true", help="skip the object table")
    p.add_argument("--image", choices=("copy", "link"), default="copy",
                   help="copy (default): OUTPUT holds the input image with its labels, so `napari OUTPUT` shows "
                        "both and the store moves whole; link: labels and table only, linked to the input by a "
                        "relative path (no second copy of a large volume)")
    g = p.add_argument_group("classical kernel (physical units)")
    g.add_argument("--diameter", type=float,
                   help="typical object diameter (default: estimated once from the image); the lengths below "
                        "follow from it, and --model resamples tiles so objects match its training objects")
    g.add_argument("--no-rescale", action="store_true",
                   help="--model: run at the image's own scale even when its objects differ in size from the "
                        "model's training objects (a warning says by how much)")
    g.add_argument("--sigma", type=float, help="smoothing (default 0.1 diameter)")
    g.add_argument("--min-distance", type=float, help="closest two object centres (default 0.3 diameter)")
    g.add_argument("--min-size", type=int,
                   help="smallest object in voxels (default 5%% of a ball one diameter across; U-Net: 12); "
                        "also for --model")
    g.add_argument("--threshold", type=float, help="foreground threshold in input units, or haematoxylin optical "
                   "density with --stain hematoxylin (default: Otsu)")
    g.add_argument("--polarity", choices=("auto", "bright", "dark"), default="auto",
                   help="objects brighter (fluorescence) or darker (brightfield) than background; auto decides once "
                        "per image (default)")
    g.add_argument("--stain", choices=("auto", "none", "hematoxylin"), default="auto",
                   help="hematoxylin: segment the haematoxylin optical density of an H&E (RGB) image; auto picks it "
                        "for dark-on-bright RGB images (default)")
    g.add_argument("--samples", type=int, help="--model trained with mc-dropout: forward passes (default: its card's)")
    g.add_argument("--input-variance", type=float,
                   help="--model trained with adf: input noise variance, normalised units (default: the training "
                        "value, 1e-3); raise it for images noisier than the training data")
    _add_precision_option(g)
    g.add_argument("--halo", type=_ints, help="halo in pixels, one or per axis (default 2 diameters): "
                                              "> largest object")
    g = p.add_argument_group("tiling")
    g.add_argument("--level", type=int, default=0, help="input pyramid level (default 0)")
    g.add_argument("--tile", type=_ints, help="tile core shape over the spatial axes (rounded to chunks)")
    g.add_argument("--batch", type=int, default=1, help="tiles per model call")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
    g.add_argument("--ngff", choices=("0.4", "0.5"), help="NGFF version to write (default: the input's)")
    _add_missing_option(g)
    _add_foreground_options(g)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("explain", help="attribution maps (integrated gradients, occlusion, Grad-CAM) for objects "
                                       "or a region",
                       description="Explain a trained segmentation or denoising model's output on chosen objects "
                                   "(their mean interior probability, or mean denoised value) or on a region: "
                                   "which input pixels drove it. Each target's crop reaches one receptive field "
                                   "(and one occlusion window) beyond it, so its map is the whole image's. Writes "
                                   "OUTPUT/attribution/METHOD (a multiscale float32 image), a PNG panel per target "
                                   "under OUTPUT/attribution/panels, and OUTPUT/tables/attribution_METHOD with the "
                                   "share of each map on its object (low: the model used the surroundings).")
    p.add_argument("input", help="OME-Zarr image (with labels and their table for --objects)")
    p.add_argument("output", help="output store")
    p.add_argument("--model", required=True, help="model folder from `tilewise train segment` or `train denoise`")
    p.add_argument("--method", choices=("ig", "occlusion", "gradcam"), default="ig",
                   help="integrated gradients (default), occlusion or Grad-CAM")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--objects", help="object ids, comma-separated, or 'all' (from --labels)")
    what.add_argument("--region", help="a box in pixels: y0:y1,x0:x1 (z0:z1,... in 3D)")
    p.add_argument("--labels", default="nuclei", help="labels image under INPUT/labels/ (default nuclei)")
    p.add_argument("--table", help="the objects' table (default: the one whose region is --labels)")
    p.add_argument("--steps", type=int, help="ig: points on the path (default: 32 per target, doubled up to 1024 "
                                             "until the completeness error is under 1 %% of the target's change)")
    p.add_argument("--baseline", choices=("zero", "blur"), default="zero",
                   help="ig and occlusion: the reference input, dark (zero, default) or blurred")
    p.add_argument("--window", type=float, help="occlusion: window, physical units (default 8 pixels)")
    p.add_argument("--stride", type=float, help="occlusion: stride, physical units (default half the window)")
    p.add_argument("--gradcam-level", type=int, help="gradcam: encoder level (default the deepest encoder block)")
    p.add_argument("--panels", type=int, default=20, help="PNG panels for the first N targets (default 20)")
    p.add_argument("--tile", type=_ints, help="tile shape that groups targets into tasks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("embed", help="per-object embeddings (trained encoder + baselines) into a table",
                       description="Embed every object of INPUT/labels/NAME (centroids from the table describing "
                                   "it): a crop centred on each object, read tile by tile with a halo so border "
                                   "objects get their untiled crop, through the trained encoder of --model (each "
                                   "level, and all together), untrained twins (--seeds), the pixels and structure "
                                   "statistics. Writes OUTPUT/tables/TABLE with one embed_<kind> column each.")
    p.add_argument("input", help="OME-Zarr image with labels and their table")
    p.add_argument("output", help="output store for the embedding table")
    p.add_argument("--labels", metavar="NAME", help="labels image under INPUT/labels/: embed its objects")
    p.add_argument("--patches", action="store_true",
                   help="embed a grid of patches instead (no labels needed; whole slides); table 'patches'")
    p.add_argument("--table", help="the table to embed (default: the one whose region is --labels)")
    p.add_argument("--model", help="tilewise model folder whose encoder gives the trained embedding")
    p.add_argument("--seeds", type=int, default=3, help="untrained encoders (default 3)")
    p.add_argument("--crop", type=float, help="crop (or patch) size in physical units (default 2x the p90 object "
                                              "diameter; patches: 64 pixels)")
    p.add_argument("--tile", type=_ints, help="tile core shape over the spatial axes (rounded to chunks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("analyze", help="score every embedding of a table beside its baselines; HTML report",
                       description="Retrieval mAP (copairs, permutation p-values), 1-NN and linear-probe accuracy "
                                   "and confound probes for every embed_* column of TABLE, each learned embedding "
                                   "also as a difference over the best baseline; --out writes a self-contained HTML "
                                   "report and its JSON.")
    p.add_argument("table", help="OUT/tables/NAME from `tilewise embed`")
    p.add_argument("--group-by", required=True, help="column naming each object's group (e.g. class_name)")
    p.add_argument("--out", help="report file (.html); the scores go beside it as .json")
    p.add_argument("--null-size", type=int, default=1000, help="permutations of the mAP null (default 1000)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("normalize-stain", help="Macenko stain normalisation of an H&E (RGB) image",
                       description="Estimate the image's haematoxylin and eosin vectors once (Macenko 2009, from "
                                   "its global sample) and re-colour every tile to a reference's stains: Macenko's "
                                   "published reference, or --reference IMAGE's own. Per pixel: tiled equals "
                                   "untiled exactly.")
    p.add_argument("input", help="RGB OME-Zarr image or slide file")
    p.add_argument("output", help="output store (RGB uint8)")
    p.add_argument("--reference", help="an image whose stains to match (default: Macenko's reference)")
    p.add_argument("--white", type=float, default=240.0, help="transmitted light through glass (default 240)")
    _add_engine_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_normalize_stain)

    p = sub.add_parser("export-geojson", help="objects as GeoJSON polygons with their measurements (QuPath)",
                       description="Trace every object of OUTPUT/labels/NAME into a GeoJSON FeatureCollection "
                                   "(pixel coordinates of the labels' level 0, the object table's columns as QuPath "
                                   "measurements), tile by tile, merged without holding all polygons in memory.")
    p.add_argument("output", help="output of `tilewise segment`")
    p.add_argument("geojson", help="file to write (.geojson; local path or fsspec URL)")
    p.add_argument("--name", default="nuclei", help="labels name in OUTPUT (default nuclei)")
    p.add_argument("--classification", help="the objects' class name in QuPath (default: the labels name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_export_geojson)

    p = sub.add_parser("evaluate", help="score labels and their uncertainty maps against ground-truth labels",
                       description="Dice, IoU and accuracy@0.5 of OUTPUT/labels/NAME against TRUTH (a labels "
                                   "image of the same shape), and for outputs of an uncertainty model the expected "
                                   "calibration error of the foreground probability and the AUROC of each "
                                   "uncertainty map as a detector of the labels' errors. Reads block by block.")
    p.add_argument("output", help="output of `tilewise segment`")
    p.add_argument("--truth", required=True, help="ground-truth labels image (e.g. IMAGE/labels/truth)")
    p.add_argument("--name", default="nuclei", help="labels name in OUTPUT (default nuclei)")
    p.add_argument("--report", help="folder for evaluation.json and reliability.png")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("denoise", help="denoise an image with a trained model, tile by tile",
                       description="Run a denoising model through the tiled engine into the image OUTPUT, with a "
                                   "pyramid; residual statistics per tile are kept and suspicious tiles logged.")
    p.add_argument("input", help="OME-Zarr image, or a slide file (SVS, NDPI, tiled or OME-TIFF)")
    p.add_argument("output", help="output store")
    p.add_argument("--model", required=True, help="model folder from `tilewise train denoise`")
    p.add_argument("--tta", choices=("auto", "on", "off"), default="auto",
                   help="test-time augmentation: average the 8 flips / rotations (8x the cost); auto: on for "
                        "inputs up to 2^26 pixels (single images), off for larger volumes")
    p.add_argument("--posterior", default="auto", metavar="{auto,off,pixel,pixel+blocks,band,band+blocks}",
                   help="N2V2 / Noise2Self models: put each noisy pixel back into the prediction where the residual "
                        "around it holds more than noise (edges, texture), with one weight per pixel or per "
                        "frequency band, then (+blocks) filter the image in blocks guided by that result; auto "
                        "(default): what training chose for this image by estimated risk (written on the model "
                        "card); off: the network's output alone")
    _add_precision_option(p)
    _add_engine_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("run", help="run a workflow (YAML): train, denoise, segment, embed... into one output store",
                       description="Run the steps of a workflow file over INPUT into one OME-Zarr store OUTPUT "
                                   "(root image, labels, tables, uncertainty maps, models, reports); re-running the "
                                   "same command resumes. Shipped workflows: workflows/lightsheet.yaml, "
                                   "wholeslide.yaml, denoise.yaml. `--check` validates the file only.")
    p.add_argument("workflow", help="workflow YAML file")
    p.add_argument("input", nargs="?", help="OME-Zarr image, or a slide file")
    p.add_argument("output", nargs="?", help="output store (created; resumed when it holds the same workflow)")
    p.add_argument("--check", action="store_true", help="validate the workflow and print it with every default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (the input is never modified)")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_run)

    _accept_verbosity_after(sub)
    return parser


def _accept_verbosity_after(sub) -> None:
    """``-v`` / ``-q`` also after a command (``tilewise run -v ...``); SUPPRESS keeps the global
    value when they are not given there."""
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _accept_verbosity_after(nested[0])
            continue
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                             help="more log output (-vv for debug)")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="only errors: no progress, notes or warnings")


def _quiet_dask(level: int) -> None:
    """Dask's own INFO lines (scheduler and worker start-up, connections) only with ``-vv``.

    distributed sets its loggers' levels from its config when first imported, in this process
    and in every worker it spawns: the environment variable reaches both, the loop covers a
    distributed that is already imported (the CLI called from Python).
    """
    os.environ["DASK_LOGGING__DISTRIBUTED"] = logging.getLevelName(level).lower()
    import distributed  # noqa: F401  (configures its loggers; quieted below)

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet and not args.verbose else logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _quiet_dask(max(level, logging.WARNING) if args.verbose < 2 else level)
    func: Callable = args.func
    try:
        func(args)
    except TilewiseError as exc:
        print(f"tilewise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tilewise: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
