"""The ``tilewise`` command line. Turns :class:`TilewiseError` into a one-line message, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from pipeline.errors import OptionError, TilewiseError

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


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--ngff", choices=("0.5", "0.4"), default="0.5", help="NGFF version to write (default 0.5)")


def _client(args):
    from pipeline.cluster import connect

    return connect(scheduler=args.scheduler, scheduler_file=args.scheduler_file, n_workers=args.workers)


def cmd_info(args) -> None:
    from pipeline.info import describe

    print(describe(args.store))


def cmd_sample(args) -> None:
    from pipeline.io import store

    if store.exists(args.out) and not args.overwrite:  # fail before starting a cluster
        from pipeline.io.store import prepare_output

        prepare_output(args.out, False)
    with _client(args) as client:
        progress = not args.quiet
        if args.name == "lightsheet":
            from pipeline.data import make_lightsheet

            make_lightsheet(args.out, client, shape=args.shape or (96, 512, 512), seed=args.seed,
                            chunks=args.chunks, version=args.ngff, overwrite=args.overwrite, progress=progress)
        elif args.name == "wholeslide":
            from pipeline.data import make_wholeslide

            make_wholeslide(args.out, client, shape=args.shape or (4096, 4096), seed=args.seed,
                            version=args.ngff, overwrite=args.overwrite, progress=progress)
        else:
            from pipeline.data import fetch_sample

            if args.shape:
                raise OptionError(f"--shape applies to synthetic samples; '{args.name}' is a real image of fixed size.")
            fetch_sample(args.name, args.out, client, overwrite=args.overwrite, version=args.ngff, progress=progress)
    print(f"wrote {args.out}")


def cmd_convert(args) -> None:
    from pipeline.io import store
    from pipeline.io.convert import convert

    if store.exists(args.output) and not args.overwrite:
        store.prepare_output(args.output, False)
    with _client(args) as client:
        convert(args.input, args.output, client, axes=args.axes, scale=args.scale, chunks=args.chunks,
                shards=args.shards, version=args.ngff, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilewise", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(max(level, logging.WARNING))
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
