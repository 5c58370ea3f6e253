"""GPU figures (run on a CUDA machine; CI has none, so ``make bench`` skips this without CUDA).

    python -m benchmarks.bench_gpu [--shape 128,1024,1024] [--train-steps 300] [--tiles-in-flight 1,2,4]
                                   [--parts agreement,throughput]

Uses the default cluster's GPU workers, as a user's ``tilewise run-kernel`` would: one worker
process per GPU, model tasks asking for ``resources={"GPU": 1}``, so it exercises the CUDA path
end to end.

- agreement: the conv-net tiled through the engine on the GPU against the same kernel on the whole
  padded volume on the GPU and on the CPU (max abs difference, float32).
- training: N2V2 3D steps per second on the GPU (default patch and batch of ``tilewise train``).
- throughput: voxels/s through the engine (read + kernel + crop + write) against the same kernel
  on in-memory padded tiles of the same shapes, as tasks on the same GPU worker, for the conv-net
  and the trained denoiser; best of two interleaved rounds; for each number of tiles in flight
  per GPU worker (``pipeline.engine.cluster.gpu_worker_specs``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_engine import CONVNET, _random_volume
from benchmarks.measure import previous, save

TILE = (64, 256, 256)


def _direct_tiles(spec, cores) -> float:
    """The resident kernel on in-memory padded tiles of the given core shapes (GPU worker)."""
    from kernels import resident

    kernel = resident(spec)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for core in cores:
        block = rng.random((1, 1, *(c + 2 * h for c, h in zip(core, kernel.traits.halo))), dtype=np.float32)
        kernel.run(block)
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


def part_agreement(work: Path, client) -> dict:
    from kernels import KernelSpec, build_kernel
    from pipeline.io import open_image
    from pipeline.steps.apply import run_kernel
    from pipeline.engine.stats import Normalisation

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
    gpu = client.submit(_whole, CONVNET, x, "cuda", resources={"GPU": 1}, pure=False).result()
    cpu = _whole(CONVNET, x, "cpu")
    return {"shape": list(shape), "tile": [32, 128, 128],
            "max_abs_tiled_gpu_vs_whole_gpu": float(np.abs(tiled - gpu).max()),
            "max_abs_tiled_gpu_vs_whole_cpu": float(np.abs(tiled - cpu).max()),
            "max_abs_whole_gpu_vs_whole_cpu": float(np.abs(gpu - cpu).max()),
            "output_range": [float(cpu.min()), float(cpu.max())]}


def _train(url: str, model: str, steps: int) -> dict:
    from pipeline.steps.train import train_denoise

    t0 = time.perf_counter()
    card = train_denoise(url, model, method="n2v2", steps=steps, overwrite=True, progress=False, device="cuda")
    seconds = time.perf_counter() - t0
    steps_run = card.training["history"][-1]["step"]
    return {"steps": steps_run, "seconds": seconds, "steps_per_s": steps_run / seconds,
            "patch": card.training["patch"], "batch": card.training["batch"], "width": card.training["width"]}


def prepare_throughput(work: Path, client, shape, train_steps: int) -> tuple[str, str, dict]:
    """The random input volume and an N2V2 model trained on it on the GPU (in the client process,
    as ``tilewise train`` runs); returns their paths and the training figures."""
    url = str(work / "in.ome.zarr")
    _random_volume(url, shape, client)
    model = str(work / "model-n2v2")
    training = _train(url, model, train_steps)
    print("training", training, flush=True)
    return url, model, training


def part_throughput(work: Path, client, url: str, model: str, shape) -> dict:
    from kernels import KernelSpec, build_kernel
    from pipeline.steps.denoise import denoise, model_spec
    from pipeline.engine.plan import make_plan
    from pipeline.steps.apply import run_kernel

    rows = {}
    kernels = {"convnet": KernelSpec.of("convnet", **CONVNET), "denoise_n2v2": model_spec(model)}
    voxels = int(np.prod(shape))
    for name, spec in kernels.items():
        halo = build_kernel(spec).traits.halo
        plan = make_plan(shape, "zyx", TILE, dict(zip("zyx", halo)), tile_shape=TILE)
        cores = [tuple(sl.stop - sl.start for sl in t.core) for t in plan]
        client.submit(_direct_tiles, spec, cores[:1], resources={"GPU": 1}, pure=False).result()  # load + warm
        engine_s, tile_stage_s, direct_s = [], [], []
        for _ in range(2):
            direct_s.append(client.submit(_direct_tiles, spec, cores, resources={"GPU": 1}, pure=False).result())
            t0 = time.perf_counter()
            out = str(work / f"out-{name}.ome.zarr")
            if name == "convnet":
                summary = run_kernel(url, out, spec, client, tile_shape=TILE, progress=False, overwrite=True)
            else:
                summary, _ = denoise(url, out, model, client, tile_shape=TILE, progress=False, overwrite=True)
            engine_s.append(time.perf_counter() - t0)
            tile_stage_s.append(summary.seconds)
        rows[name] = {"halo": list(halo), "tiles": len(cores), "engine_end_to_end_s_by_round": engine_s,
                      "engine_tile_stage_s_by_round": tile_stage_s, "direct_s_by_round": direct_s,
                      "engine_voxels_per_s": voxels / min(engine_s), "direct_voxels_per_s": voxels / min(direct_s),
                      "efficiency_tile_stage": min(direct_s) / min(tile_stage_s),
                      "efficiency_end_to_end": min(direct_s) / min(engine_s)}
        print(name, rows[name], flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="128,1024,1024")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--tiles-in-flight", default="1,2,4", help="GPU tiles in flight per worker to compare")
    parser.add_argument("--parts", default="agreement,throughput")
    args = parser.parse_args(argv)
    import torch

    from pipeline.engine.cluster import connect

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; skipped")
        return {}
    parts = set(args.parts.split(","))
    shape = tuple(int(v) for v in args.shape.split(","))
    results: dict = previous("gpu") if parts != {"agreement", "throughput"} else {}
    results.update({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "tf32_conv": torch.backends.cudnn.allow_tf32})
    with tempfile.TemporaryDirectory(prefix="tilewise-bench-gpu-") as tmp:
        work = Path(tmp)
        with connect(gpu_tiles=1) as client:  # the default cluster: its GPU workers
            if "agreement" in parts:
                results["agreement"] = part_agreement(work, client)
                print("agreement", results["agreement"], flush=True)
            if "throughput" in parts:
                url, model, training = prepare_throughput(work, client, shape, args.train_steps)
        if "throughput" in parts:
            results["throughput"] = {"shape": list(shape), "tile": list(TILE), "training_n2v2_3d": training,
                                     "note": "engine = end to end (statistics, tiles, pyramid) or the tile stage, on "
                                             "the default GPU cluster; direct = the resident kernel on in-memory padded "
                                             "tiles of the same shapes on the same GPU worker; best of 2 rounds.",
                                     "by_tiles_in_flight": {}}
            for k in (int(v) for v in args.tiles_in_flight.split(",")):
                with connect(gpu_tiles=k) as client:
                    print("tiles in flight", k, flush=True)
                    results["throughput"]["by_tiles_in_flight"][str(k)] = part_throughput(work, client, url, model,
                                                                                          shape)
                save("gpu", results)
    save("gpu", results)
    return results


if __name__ == "__main__":
    main()
