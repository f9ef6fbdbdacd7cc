"""``bench``: measured wall-clock speed of dense vs ActVAR generation, beside the FLOPs ideal.

Both models generate the same classes with the same per-image seeds. After warm-up the
runs alternate (dense, sparse, dense, ...) so that drift in machine speed hits both alike;
medians are reported. Transformer time (the whole autoregressive loop) and VAE decode
time are measured separately.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import SparsityPolicy
from .device import autocast, synchronize
from .flops import count_flops
from .model import VAR
from .sampling import SamplingOptions, decode_images, generate, image_generators
from .vqvae import VQVAE

Progress = Callable[[int, int], None]


class PeakMemory:
    """Peak CUDA allocation, or on the CPU the peak resident set size sampled every few ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import psutil  # installed with accelerate
        except ImportError:  # pragma: no cover
            return self
        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.005)

        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


def _one_run(
    model: VAR,
    vae: VQVAE,
    labels: torch.Tensor,
    seed: int,
    opts: SamplingOptions,
    policy: SparsityPolicy | None,
    device: torch.device,
    dtype: str,
) -> tuple[float, float, int]:
    rng = image_generators(seed, range(labels.shape[0]), device)
    with PeakMemory(device) as mem:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            gen = generate(model, vae, labels, opts, rng=rng, policy=policy)
        synchronize(device)
        t1 = time.perf_counter()
        decode_images(vae, gen.f_hat)
        synchronize(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, mem.peak


def bench(
    dense: VAR,
    sparse: VAR,
    vae: VQVAE,
    device: torch.device,
    dtype: str = "fp32",
    batch_size: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    classes: tuple[int, ...] = (980, 437, 22, 562, 207, 360, 387, 974),
    seed: int = 0,
    policy: SparsityPolicy | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    policy = policy or sparse.policy
    labels = torch.tensor([classes[i % len(classes)] for i in range(batch_size)], device=device)
    opts = SamplingOptions()
    runs: dict[str, list[tuple[float, float, int]]] = {"dense": [], "sparse": []}
    total = 2 * (warmup + repeats)
    done = 0
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for name, model, pol in (("dense", dense, None), ("sparse", sparse, policy)):
                result = _one_run(model, vae, labels, seed, opts, pol, device, dtype)
                if r >= warmup:
                    runs[name].append(result)
                done += 1
                if progress:
                    progress(done, total)

    def summary(name: str) -> dict[str, Any]:
        gen = statistics.median(t for t, _, _ in runs[name])
        dec = statistics.median(d for _, d, _ in runs[name])
        return {
            "generation_s": gen,
            "decode_s": dec,
            "end_to_end_s": gen + dec,
            "images_per_s": batch_size / gen,
            "images_per_s_end_to_end": batch_size / (gen + dec),
            "peak_memory_mb": max(m for _, _, m in runs[name]) / 2**20,
            "generation_s_all": [round(t, 4) for t, _, _ in runs[name]],
        }

    d, s = summary("dense"), summary("sparse")
    flops = count_flops(sparse.cfg, policy)
    ideal = flops.dense_flops / flops.sparse_flops
    speedup = d["generation_s"] / s["generation_s"]
    return {
        "device": str(device),
        "dtype": dtype,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "policy": policy.to_dict(),
        "dense": d,
        "sparse": s,
        "speedup": speedup,
        "speedup_end_to_end": d["end_to_end_s"] / s["end_to_end_s"],
        "ideal_speedup": ideal,
        "efficiency": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
        "dense_flops": flops.dense_flops,
        "sparse_flops": flops.sparse_flops,
        "savings": flops.savings,
        "memory_kind": PeakMemory(device).kind,
    }


def load_pair(dense: str | None, sparse: str | None, arch: str | None, vae: str | None) -> tuple[VAR, VAR, VQVAE, str]:
    """The two models to compare and a VAE, from files or (``arch``) with random weights.

    Timing does not depend on the weights, so a missing VAE is replaced by one of the
    official shape with random weights, and ``--arch`` converts a random model in memory
    (router and selector from weight statistics: no calibration needed to time it).
    """
    from .checkpoint import BUILTIN_TINY, load_vae, load_var
    from .config import VAEConfig, arch_config
    from .conversion import MoefyOptions, moefy
    from .errors import ConfigError
    from .hub import resolve_local
    from .tiny import TINY_VAE_CONFIG, random_state_dict

    notes = []
    if arch is not None:
        if dense or sparse:
            raise ConfigError("give --arch or two checkpoints, not both")
        cfg = arch_config(arch)
        sd = random_state_dict(VAR(cfg), 0)
        dense_model = _from_sd(cfg, sd)
        sparse_model, _ = moefy(_from_sd(cfg, sd), None, MoefyOptions(calib_images=0))
        notes.append(f"random {arch} weights, converted in memory with the default policy")
    else:
        if not (dense and sparse):
            raise ConfigError("give the dense and the ActVAR checkpoint (or --arch)")
        dense_model, _ = load_var(resolve_local(dense))
        sparse_model, info = load_var(resolve_local(sparse))
        if info.kind != "actvar":
            raise ConfigError(f"{sparse} is not an ActVAR model", "convert it first with `actvar moefy`")
        if sparse_model.cfg.replace(num_experts=0) != dense_model.cfg:
            raise ConfigError("the two models have different architectures")
    if vae is not None:
        vae_model, _ = load_vae(resolve_local(vae), dense_model.cfg.patch_nums)
    else:
        small = dense_model.cfg.embed_dim < 512
        vae_cfg = TINY_VAE_CONFIG if small or arch == BUILTIN_TINY else VAEConfig()
        vae_cfg = type(vae_cfg)(**{**vae_cfg.to_dict(), "patch_nums": dense_model.cfg.patch_nums})
        vae_model = VQVAE(vae_cfg)
        vae_model.load_state_dict(random_state_dict(vae_model, 1))
        vae_model.eval().requires_grad_(False)
        notes.append(f"decode timed with a random-weight VQVAE (ch={vae_cfg.ch})")
    return dense_model, sparse_model, vae_model, "; ".join(notes)


def _from_sd(cfg, sd) -> VAR:
    with torch.device("meta"):
        model = VAR(cfg)
    model.load_state_dict(sd, strict=True, assign=True)  # the models may share tensors: inference never writes them
    model.policy = None
    return model.eval().requires_grad_(False)
