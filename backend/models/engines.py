"""Which inference engine runs the feature network (the VAE encoder and the cut U-Net): ``FREESEG_ENGINE``.

* ``torch``: PyTorch eager;
* ``compile``: ``torch.compile`` (inductor) in channels-last memory format: it fuses the element-wise work
  between the convolutions (group norms, SiLU, residual additions), and oneDNN's convolutions are faster so;
* ``openvino``: the network converted once with ``openvino.convert_model`` and compiled for this CPU, in
  the models' dtype (bfloat16 on CPUs that have it);
* ``auto``: ``openvino`` for bfloat16 on the CPU where the package is installed, ``torch`` in float32 and on
  CUDA (docs/benchmarks.md has the figures that chose it).

OpenVINO's converted network is kept under ``MODEL_DIR/engines/<fingerprint>-<weights>-openvino`` (the
fingerprint names the models, their dtype and the feature settings; the weights' digest their values), so only the
first start pays for the conversion; inductor caches its kernels itself. Where an engine is missing or fails, the
process logs why and runs on torch: a prediction never fails for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from backend.pipeline.features import FeatureExtractor, FeatureNetwork, FeatureRunner
from backend.settings import EngineChoice

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 15.0  # how often a long conversion says it is still working


def resolve_engine(choice: EngineChoice, device: torch.device, dtype: torch.dtype) -> str:
    """The engine ``choice`` names; ``auto`` is openvino for bfloat16 on a CPU that has it installed, else torch.

    OpenVINO's gain is its bfloat16 kernels. In float32, as on AVX2-only CPUs, it gained little on a whole
    prediction for twice the peak memory, a long first conversion and gigabytes on disk: float32 stays on torch
    unless asked (docs/benchmarks.md, "The inference engine on the CPU (`FREESEG_ENGINE`)", has the figures).
    """
    if choice != "auto":
        return choice
    return "openvino" if device.type == "cpu" and dtype == torch.bfloat16 and openvino_installed() else "torch"


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def feature_extractor(network: FeatureNetwork, choice: EngineChoice, cache_root: Path,
                      fingerprint: str) -> FeatureExtractor:
    """``network`` on the engine ``choice`` resolves to, its converted form cached under ``cache_root``; torch
    (with a logged reason) where that engine cannot run it."""
    engine = resolve_engine(choice, network.context.device, network.context.dtype)
    eager = FeatureExtractor(network)
    if engine == "torch":
        return eager
    example = eager.pixels([_example_image(network)])
    try:
        folder = cache_root / f"{fingerprint}-{weights_digest(network)}-{engine}"
        runner = _BUILDERS[engine](network, example, folder)
    except Exception as error:  # noqa: BLE001: any failure of an optional engine falls back, with its reason
        log.warning("FREESEG_ENGINE=%s: the %s engine could not run the feature network (%s: %s); "
                    "running it on torch instead", choice, engine, type(error).__name__, error)
        return eager
    return FeatureExtractor(network, runner, engine)


def weights_digest(network: torch.nn.Module) -> str:
    """A short hash of the network's parameters (names, shapes and their first values): a converted network is
    never reused for other weights under the same model names."""
    digest = hashlib.sha256()
    for name, parameter in network.state_dict().items():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(parameter.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def _example_image(network: FeatureNetwork) -> np.ndarray:
    size = network.settings.image_size
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _openvino(network: FeatureNetwork, example: torch.Tensor, folder: Path) -> FeatureRunner:
    """The network converted to OpenVINO (once, then read from ``folder``), compiled for this CPU."""
    import openvino

    path = folder / "features.xml"
    if not path.exists():
        with progress_logged(f"converting the feature network to OpenVINO (once; kept in {folder})"), \
                warnings.catch_warnings():
            # diffusers' shape tests (batches of 64 and more, tensors over 2**31 elements) pick memory layouts
            # only; the trace keeps the branch of the example, which computes the same values.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = openvino.convert_model(_Float32Boundary(network).eval(), example_input=example.float(),
                                           input=[openvino.PartialShape([-1, *example.shape[1:]])])
        with atomic_folder(folder) as staging:
            openvino.save_model(model, staging / path.name, compress_to_fp16=False)
    precision = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(network.context.dtype, "f32")
    compiled = openvino.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    })
    dtype = network.context.dtype

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(compiled(pixels.float().numpy())[0]).to(dtype)

    run(example)  # the first inference allocates and tunes: pay it at start, not on the first image
    return run


def _compile(network: FeatureNetwork, example: torch.Tensor) -> FeatureRunner:
    """``torch.compile`` with inductor, channels-last. Inductor keeps the compiled kernels in its own cache
    (``TORCHINDUCTOR_CACHE_DIR``, read once per process, so not ours to move), which later starts reuse. A second
    batch size recompiles once with a dynamic batch dimension (``dynamic=None``), not once per size."""
    try:
        compiled = torch.compile(network.to(memory_format=torch.channels_last), backend="inductor")

        def run(pixels: torch.Tensor) -> torch.Tensor:
            return compiled(pixels.contiguous(memory_format=torch.channels_last))

        with progress_logged("compiling the feature network with torch.compile (inductor caches the kernels)"):
            with torch.inference_mode():
                run(example)
    except Exception:
        network.to(memory_format=torch.contiguous_format)  # the eager fallback runs the layout it was measured in
        raise
    return run


class _Float32Boundary(torch.nn.Module):
    """The network with float32 input and output, whatever its own dtype: OpenVINO's inputs are numpy arrays."""

    def __init__(self, network: FeatureNetwork):
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixels.to(self.network.context.dtype)).float()


_BUILDERS: dict[str, Callable[[FeatureNetwork, torch.Tensor, Path], FeatureRunner]] = {
    "openvino": _openvino, "compile": lambda network, example, _folder: _compile(network, example),
}


@contextmanager
def progress_logged(what: str) -> Iterator[None]:
    """Logs ``what`` at the start, every PROGRESS_SECONDS while it runs, and its duration at the end."""
    log.info("%s ...", what)
    start, done = time.perf_counter(), threading.Event()

    def heartbeat() -> None:
        while not done.wait(PROGRESS_SECONDS):
            log.info("%s: still working, %.0f s so far", what, time.perf_counter() - start)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """A staging folder beside ``folder`` that replaces it when the block succeeds: readers never see half a
    conversion, and two processes converting at once leave one whole result."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: keep its result
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
