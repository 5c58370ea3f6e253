"""GPU figures (run on a CUDA machine; CI has none, so ``make bench`` skips this without CUDA).

    python -m benchmarks.bench_gpu [--parts model_rate,posterior,agreement,throughput,attribution]
                                   [--shape 128,1024,1024]
                                   [--tiles 64x256x256,128x256x256] [--configs 128x256x256:bf16:cl,...]
                                   [--widths 32,16] [--width 32] [--train-steps 40] [--tiles-in-flight 4]

- model_rate: the N2V2 3D network alone on tensors already on the GPU (no engine, no copies), in
  core voxels per second of one tile with the default denoiser's halo (the network's receptive
  field plus the posterior step's window), at widths 32 (the network of the first GPU figure,
  2026-11-24) and 16 (``tilewise train``'s default now), for each tile, precision (fp32 with
  TF32 convolutions, bf16 and fp16 autocast), memory format (contiguous, ``channels_last_3d``)
  and cuDNN autotuning (``cudnn.benchmark``) off and on.
- posterior: the denoiser's posterior step in torch on the GPU, each of its choices (``pixel``,
  ``pixel+blocks``, ``band``, ``band+blocks``) on 2D and 3D tiles (``--posterior-tiles``),
  and the copies of a padded tile to the GPU and back.
- agreement: the conv-net tiled through the engine on the GPU against the same kernel on the whole
  padded volume on the GPU and on the CPU (max abs difference, float32).
- throughput: an N2V2 model trained on the GPU on the random volume (``--train-steps``: the
  rate, not its quality, is measured here), then voxels/s through the engine (statistics, tiles,
  pyramid) against the resident kernel on in-memory padded tiles of the same shapes on the same
  GPU worker (copies, network, posterior step), for each tile, precision and memory layout
  (``--configs``); best of two rounds.
- attribution (not in the default parts; ``--attribution-image``, ``--attribution-model``):
  ``tilewise explain`` (integrated gradients, occlusion, Grad-CAM) of objects of a 2D image on
  the GPU worker: seconds per object, the IG completeness error, and the attribution images
  against a reference run of the same part on a CPU (``--attribution-reference``: the folder
  of ``... --smoke --attribution-keep DIR`` on a machine without CUDA); ``--attribution-model``
  takes several model folders, comma-separated.

Without CUDA, ``--smoke`` runs every part on the CPU at the sizes given (a check of the code
before device time is spent; no figures are saved).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_engine import CONVNET, _random_volume
from benchmarks.measure import previous, save

PRECISIONS = ("fp32", "bf16", "fp16")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(","))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, *, warmup: int = 2, repeats: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_model_rate(cores: list[tuple[int, ...]], widths: list[int], device: str) -> list[dict]:
    import contextlib

    import torch

    from kernels import posterior
    from kernels.denoise import architecture
    from kernels.unet import UNet, receptive_field

    rows = []
    for width in widths:
        cfg = architecture("n2v2", 3, 1, depth=2, width=width)
        net = UNet(cfg).to(device).eval()
        halo = [h + posterior.radius(3) for h in receptive_field(cfg).halo]
        for core in cores:
            padded = tuple(c + 2 * h for c, h in zip(core, halo))
            x = torch.rand((1, 1, *padded), device=device)
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                for fmt in ("contiguous", "channels_last_3d"):
                    memory = torch.channels_last_3d if fmt == "channels_last_3d" else torch.contiguous_format
                    net = net.to(memory_format=memory)
                    xf = x.contiguous(memory_format=memory)
                    for precision in PRECISIONS:
                        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

                        def forward():
                            with torch.inference_mode(), (torch.autocast(device_type=device.split(":")[0], dtype=dtype)
                                                          if dtype else contextlib.nullcontext()):
                                return net.forward_padded(xf)

                        seconds = _median_seconds(forward, device)
                        row = {"width": width, "core": list(core), "padded": list(padded), "precision": precision,
                               "memory_format": fmt, "cudnn_benchmark": bench, "seconds": seconds,
                               "core_voxels_per_s": float(np.prod(core)) / seconds,
                               "padded_voxels_per_s": float(np.prod(padded)) / seconds}
                        rows.append(row)
                        print("model_rate", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                              flush=True)
            torch.backends.cudnn.benchmark = False
        net = x = None  # free the device before the next width
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def part_posterior(cores: list[tuple[int, ...]], device: str) -> list[dict]:
    """The posterior step in torch on the device, each choice on one tile padded by the 2D or 3D
    N2V2 network's receptive field plus that choice's reach, and the copies of such a tile to the
    device and back. The step's cost does not depend on the network, so a noisy random tile and
    a smoothed copy of it stand in for the input and the prediction."""
    import torch

    from kernels import blockwiener, posterior, posterior_device
    from kernels.denoise import architecture
    from kernels.unet import receptive_field

    table = {"noise": [[0.01, 0.02, 1e-4]], "leak_centres": [[0.0, 1e-3, 1e-2]], "leak": [[0.02, 0.05, 0.12]]}
    rows = []
    for core in cores:
        ndim = len(core)
        field = receptive_field(architecture("n2v2", ndim, 1, depth=2, width=32)).halo
        row: dict = {"core": list(core), "seconds_by_choice": {}, "padded_by_choice": {},
                     "wiener_block_every": [blockwiener.BLOCK[ndim], blockwiener.STEP[ndim]]}
        for how in posterior.CHOICES:
            if how == "off":
                continue
            padded = tuple(c + 2 * (h + posterior.radius(ndim, choice=how)) for c, h in zip(core, field))
            generator = torch.Generator(device=device).manual_seed(0)
            y = torch.rand((1, *padded), device=device, generator=generator)
            mu = 0.5 * y + 0.25
            seconds = _median_seconds(lambda: posterior_device.apply(y, mu, table, choice=how), device, warmup=1)
            row["seconds_by_choice"][how] = seconds
            row["padded_by_choice"][how] = list(padded)
            row[f"core_voxels_per_s_{how}"] = float(np.prod(core)) / seconds
            y = mu = None
        host = np.random.default_rng(0).random((1, 1, *padded), dtype=np.float32)
        row["copy_in_out_seconds"] = _median_seconds(lambda: torch.from_numpy(host).to(device).cpu().numpy(), device)
        rows.append(row)
        print("posterior", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def _direct_tiles(spec, cores) -> float:
    """The resident kernel on in-memory padded tiles of the given core shapes (GPU worker)."""
    from kernels import resident

    kernel = resident(spec)
    rng = np.random.default_rng(0)
    shapes = [(1, 1, *(c + 2 * h for c, h in zip(core, kernel.traits.halo))) for core in cores]
    blocks = {shape: rng.random(shape, dtype=np.float32) for shape in set(shapes)}  # made before the clock starts
    t0 = time.perf_counter()
    for shape in shapes:
        kernel.run(blocks[shape])
    return time.perf_counter() - t0


def _whole(spec_params: dict, volume: np.ndarray, device: str) -> np.ndarray:
    from kernels import KernelSpec, build_kernel

    kernel = build_kernel(KernelSpec.of("convnet", **spec_params))
    kernel.load(device)
    halo = kernel.traits.halo
    pad = [(0, 0), (0, 0)] + [(h, h) for h in halo]
    out = kernel.run(np.pad(volume[None, None], pad, mode="reflect"))
    crop = (0, 0) + tuple(slice(h, h + s) for h, s in zip(halo, volume.shape))
    return out[crop]


def part_agreement(work: Path, client, device: str, gpu: dict | None) -> dict:
    from kernels import KernelSpec, build_kernel
    from pipeline.engine.stats import Normalisation
    from pipeline.io import open_image
    from pipeline.steps.apply import run_kernel

    shape = (45, 300, 333)  # not multiples of the tile
    url = str(work / "agree.ome.zarr")
    _random_volume(url, shape, client, chunks=(32, 128, 128))
    spec = KernelSpec.of("convnet", **CONVNET)
    run_kernel(url, str(work / "agree-out.ome.zarr"), spec, client, tile_shape=(32, 128, 128), progress=False,
               overwrite=True)
    tiled = open_image(str(work / "agree-out.ome.zarr")).read((slice(None),) * 3)
    source = open_image(url)
    raw = source.read((slice(None),) * 3).astype(np.float32)
    norm = Normalisation.of(source)
    x = norm.apply(raw[None])[0] if build_kernel(spec).traits.input == "normalised" else raw
    on_device = client.submit(_whole, CONVNET, x, device, resources=gpu, pure=False).result()
    cpu = _whole(CONVNET, x, "cpu")
    return {"shape": list(shape), "tile": [32, 128, 128],
            "max_abs_tiled_gpu_vs_whole_gpu": float(np.abs(tiled - on_device).max()),
            "max_abs_tiled_gpu_vs_whole_cpu": float(np.abs(tiled - cpu).max()),
            "max_abs_whole_gpu_vs_whole_cpu": float(np.abs(on_device - cpu).max()),
            "output_range": [float(cpu.min()), float(cpu.max())]}


def _train(url: str, model: str, steps: int, width: int, device: str) -> dict:
    from pipeline.steps.train import train_denoise

    t0 = time.perf_counter()
    card = train_denoise(url, model, method="n2v2", steps=steps, width=width, overwrite=True, progress=False,
                         device=device)
    seconds = time.perf_counter() - t0
    steps_run = card.training["history"][-1]["step"]
    return {"steps": steps_run, "seconds": seconds, "steps_per_s": steps_run / seconds,
            "patch": card.training["patch"], "batch": card.training["batch"], "width": card.training["width"],
            "posterior": card.posterior is not None}


def _config(text: str) -> tuple[tuple[int, ...], str, bool]:
    """``64x256x256:bf16`` or ``128x256x256:bf16:cl`` (channels-last) -> (tile, precision, channels_last)."""
    tile, precision, *rest = text.split(":")
    return _shape(tile), precision, rest == ["cl"]


def part_throughput(work: Path, client, url: str, model: str, shape, configs, gpu: dict | None) -> list[dict]:
    from kernels import KernelSpec, build_kernel
    from pipeline.engine.plan import make_plan
    from pipeline.steps.apply import run_kernel
    from pipeline.steps.denoise import model_spec

    rows = []
    voxels = int(np.prod(shape))
    for tile, precision, channels_last in configs:
        spec = model_spec(model, precision=precision, tta=False)
        if channels_last:
            spec = KernelSpec.of(spec.name, **spec.params, channels_last=True)
        halo = build_kernel(spec).traits.halo
        plan = make_plan(shape, "zyx", tile, dict(zip("zyx", halo)), tile_shape=tile)
        cores = [tuple(sl.stop - sl.start for sl in t.core) for t in plan]
        client.submit(_direct_tiles, spec, cores[:1], resources=gpu, pure=False).result()  # load + warm
        engine_s, tile_stage_s, direct_s = [], [], []
        for _ in range(2):
            direct_s.append(client.submit(_direct_tiles, spec, cores, resources=gpu, pure=False).result())
            t0 = time.perf_counter()
            summary = run_kernel(url, str(work / "out.ome.zarr"), spec, client, tile_shape=tile, progress=False,
                                 overwrite=True)
            engine_s.append(time.perf_counter() - t0)
            tile_stage_s.append(summary.seconds)
        row = {"tile": list(tile), "precision": precision, "channels_last": channels_last, "halo": list(halo),
               "tiles": len(cores),
               "engine_end_to_end_s_by_round": engine_s, "engine_tile_stage_s_by_round": tile_stage_s,
               "direct_s_by_round": direct_s, "engine_voxels_per_s": voxels / min(engine_s),
               "direct_voxels_per_s": voxels / min(direct_s),
               "efficiency_tile_stage": min(direct_s) / min(tile_stage_s),
               "efficiency_end_to_end": min(direct_s) / min(engine_s)}
        rows.append(row)
        print("throughput", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


ATTRIBUTION_METHODS = ("ig", "occlusion", "gradcam")


def part_attribution(work: Path, client, seg: str, model: str, objects: int, reference: Path | None) -> dict:
    """``tilewise explain`` of objects 1..``objects`` of ``seg`` (an image with its labels) with
    ``model`` for each method on ``client``: seconds per object (after one untimed object:
    workers, model and CUDA started), the largest IG completeness error, and against a
    ``reference`` run of this part (its folder: the same objects on a CPU, this machine's or
    another's) the largest difference of the attribution images and of the cheating check's
    ``attribution_inside``. Outputs stay in ``work``."""
    import json

    from pipeline.io import open_image
    from pipeline.io.tables import read_table
    from pipeline.steps.explain import explain

    work.mkdir(parents=True, exist_ok=True)
    theirs_seconds = json.loads((reference / "timings.json").read_text()) if reference else {}
    # a first object, untimed: the workers start and load the model (on a GPU, CUDA starts too)
    explain(seg, str(work / "warm-up.ome.zarr"), client, model=model, method=ATTRIBUTION_METHODS[0], objects=[1],
            panels=0, progress=False, overwrite=True)
    rows = {}
    for method in ATTRIBUTION_METHODS:
        out = work / f"explain-{method}.ome.zarr"
        summary = explain(seg, str(out), client, model=model, method=method, objects=list(range(1, objects + 1)),
                          panels=0, progress=False, overwrite=True)
        row = {"objects": summary.targets, "seconds_per_object": summary.seconds_per_target,
               "completeness_error_max": summary.completeness_error_max}
        if reference:
            mine = open_image(summary.image).read((slice(None),) * 2)
            theirs = open_image(str(reference / out.name / "attribution" / method)).read((slice(None),) * 2)
            inside = [np.asarray(read_table(str(where), f"attribution_{method}")["attribution_inside"])
                      for where in (out, reference / out.name)]
            row.update({"max_abs_difference_vs_reference": float(np.abs(mine - theirs).max()),
                        "max_abs_reference": float(np.abs(theirs).max()),
                        "attribution_inside_max_abs_difference": float(np.abs(inside[0] - inside[1]).max()),
                        "reference_seconds_per_object": theirs_seconds.get(method)})
        rows[method] = row
        print("attribution", method, row, flush=True)
        (work / "timings.json").write_text(json.dumps({m: r["seconds_per_object"] for m, r in rows.items()}))
    return rows


def _attribution(args, work: Path, client) -> dict:
    """The attribution part for each ``--attribution-model``: the image segmented once (or the
    reference run's labels taken), each model's outputs (and its reference's) in a folder of
    its name."""
    from pipeline.steps.segment import classical_spec, segment_labels

    keep_dir = Path(args.attribution_keep) if args.attribution_keep else work / "attribution"
    reference = Path(args.attribution_reference) if args.attribution_reference else None
    seg = str((reference or keep_dir) / "seg.ome.zarr")
    if not reference:
        image = args.attribution_image
        segment_labels(image, seg, classical_spec(image), client, progress=False, overwrite=True)
    by_model = {}
    for model in args.attribution_model.split(","):
        name = Path(model).name
        print("attribution", name, flush=True)
        by_model[name] = part_attribution(keep_dir / name, client, seg, model, args.attribution_objects,
                                          reference / name if reference else None)
    return {"image": args.attribution_image, "models": by_model,
            "note": "tilewise explain through the engine on the default cluster (its GPU worker), target: the "
                    "object's mean output (a denoiser's value, a segmenter's interior probability); the "
                    "reference: the same part run on a CPU (--smoke), same labels"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="model_rate,posterior,agreement,throughput")
    parser.add_argument("--shape", default="128,1024,1024", help="throughput: the random input volume")
    parser.add_argument("--tiles", default="64x256x256,128x256x256", help="model_rate: core tile shapes")
    parser.add_argument("--configs", default="64x256x256:fp32,128x256x256:fp32,128x256x256:bf16,128x256x256:bf16:cl",
                        help="throughput: tile:precision[:cl] through the engine (cl: channels-last)")
    parser.add_argument("--widths", default="32,16", help="model_rate: network widths")
    parser.add_argument("--posterior-tiles", default="2048x2048,64x256x256,128x256x256",
                        help="posterior: core tile shapes, 2D or 3D")
    parser.add_argument("--width", type=int, default=32, help="throughput: width of the trained N2V2 network")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--tiles-in-flight", type=int, default=4, help="GPU tiles in flight per worker")
    parser.add_argument("--attribution-image", help="attribution: a 2D image (OME-Zarr) to segment and explain")
    parser.add_argument("--attribution-model", help="attribution: denoising or segmentation model folders, "
                                                    "comma-separated")
    parser.add_argument("--attribution-objects", type=int, default=20, help="attribution: objects 1..N")
    parser.add_argument("--attribution-reference", help="attribution: the folder of a CPU run of this part "
                                                        "(--smoke --attribution-keep) to compare with")
    parser.add_argument("--attribution-keep", help="attribution: keep the outputs in this folder")
    parser.add_argument("--smoke", action="store_true", help="without CUDA: run on the CPU, save nothing")
    args = parser.parse_args(argv)
    import torch

    from pipeline.engine.cluster import connect

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_gpu: no CUDA device; skipped")
        return {}
    device, gpu = ("cuda", {"GPU": 1}) if cuda else ("cpu", None)
    parts = args.parts.split(",")
    shape, tiles = _shape(args.shape), [_shape(t) for t in args.tiles.split(",")]
    configs = [_config(c) for c in args.configs.split(",")]
    results: dict = previous("gpu")
    results.update({"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "torch": torch.__version__,
                    "tf32_conv": torch.backends.cudnn.allow_tf32})

    def keep(key: str, value) -> None:
        results[key] = value
        if cuda:
            save("gpu", results)

    if "model_rate" in parts:
        keep("model_rate", {"rows": part_model_rate(tiles, [int(w) for w in args.widths.split(",")], device),
                            "note": "network alone on device tensors, median of 3 after 2 warm-ups; core voxels of "
                                    "one tile per second (padded by the denoiser's halo with the posterior step)"})
    if "posterior" in parts:
        keep("posterior", {"rows": part_posterior([_shape(t) for t in args.posterior_tiles.split(",")], device),
                           "note": "the posterior step per choice in torch (float64) on the device, median of 3 "
                                   "after 1 warm-up; copies: one padded float32 tile to the device and back"})
    with tempfile.TemporaryDirectory(prefix="tilewise-bench-gpu-") as tmp:
        work = Path(tmp)
        with connect(gpu_tiles=args.tiles_in_flight) as client:  # the default cluster: its GPU workers
            if "attribution" in parts:
                keep("attribution", _attribution(args, work, client))
            if "agreement" in parts:
                keep("agreement", part_agreement(work, client, device, gpu))
                print("agreement", results["agreement"], flush=True)
            if "throughput" in parts:
                url = str(work / "in.ome.zarr")
                _random_volume(url, shape, client)
                model = str(work / "model-n2v2")
                training = _train(url, model, args.train_steps, args.width, device)
                print("training", training, flush=True)
                keep("throughput", {"shape": list(shape), "tiles_in_flight": args.tiles_in_flight,
                                    "training_n2v2_3d": training,
                                    "note": "engine = end to end (statistics, tiles, pyramid) or its tile stage, "
                                            "on the default GPU cluster; direct = the resident kernel on in-memory "
                                            "padded tiles of the same shapes on the same GPU worker (copies, "
                                            "network, posterior step); best of 2 rounds; TTA off.",
                                    "rows": part_throughput(work, client, url, model, shape, configs, gpu)})
    return results


if __name__ == "__main__":
    main()
