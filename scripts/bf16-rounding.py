"""Would bfloat16 change the masks? Answered on a CPU without bfloat16 instructions.

`freesegdiff bench --dtype bfloat16 --compare-dtype float32` answers it where bfloat16 is
native (AVX512-BF16, AMX, GPUs). Where it is not, PyTorch emulates it hundreds of times more
slowly, so this script simulates its rounding instead: the VAE's and U-Net's weights, and
every layer's inputs and outputs, are rounded to bfloat16 while the arithmetic stays float32
(as native kernels accumulate in float32). It prints, per image, the features' relative
error and how far the K-means cluster maps of the two agree after matching clusters
(the bench's measure). It says nothing about speed.

    .venv/bin/python scripts/bf16-rounding.py --images 4 --k 4,8,16    # random-full, BLIP base
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
import torch

from backend.benchmark.bench import cluster_agreement, synthetic_images
from backend.models.process import process_segmenter
from backend.pipeline.clustering import cluster_feature_grid
from backend.settings import Settings


def bf16_rounded(value: object) -> object:
    """A float tensor's values rounded to bfloat16 (its dtype kept); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).to(value.dtype)
    return value


def round_like_bfloat16(model: torch.nn.Module) -> None:
    """Round the model's weights now, and each leaf module's inputs and outputs whenever it runs."""
    for parameter in model.parameters():
        parameter.data = bf16_rounded(parameter.data)
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(lambda _, args: tuple(bf16_rounded(a) for a in args))
            module.register_forward_hook(lambda _, args, output: bf16_rounded(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="random-full", choices=("tiny", "random-full", "pretrained"))
    parser.add_argument("--images", type=int, default=4, help="synthetic images, as the bench makes them")
    parser.add_argument("--k", default="4,8,16", help="cluster counts to compare, comma-separated")
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]

    settings = Settings(models=args.profile, captioner="blip", device="cpu", dtype="float32", engine="torch",
                        model_dir=tempfile.mkdtemp(prefix="bf16-rounding-"))
    segmenter = process_segmenter(settings)
    images = synthetic_images(args.images)
    exact = [segmenter.features([image])[0].astype(np.float32) for image in images]
    network = segmenter.features.network
    round_like_bfloat16(network)
    network.context.copy_(bf16_rounded(network.context))
    network.time_embedding.copy_(bf16_rounded(network.time_embedding))

    agreements: dict[int, list[float]] = {k: [] for k in ks}
    for index, (image, reference) in enumerate(zip(images, exact)):
        rounded = segmenter.features([image])[0].astype(np.float32)
        error = np.linalg.norm(rounded - reference) / np.linalg.norm(reference)
        for k in ks:
            grids = [cluster_feature_grid(features, k, settings.seed, "cpu") for features in (reference, rounded)]
            agreements[k].append(cluster_agreement(*grids))
        print(f"image {index}: relative feature error {error:.4f}; cluster agreement "
              + ", ".join(f"K={k} {100 * agreements[k][-1]:.2f}%" for k in ks), flush=True)
    for k, values in agreements.items():
        print(f"K={k}, {len(images)} images ({args.profile}): cluster maps agree on "
              f"{100 * min(values):.2f}% of pixels or more (median {100 * statistics.median(values):.2f}%)")


if __name__ == "__main__":
    main()
