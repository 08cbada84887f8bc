"""Lets megatron-core 0.16 run on CPU with gloo. Does nothing when CUDA is present.

megatron-core assumes a GPU in a few places that the MoE GPT path touches:

* ``torch.cuda.current_device()`` picks the device of buffers (router, attention masks,
  mappings). On CPU it raises, so it is made to return ``"cpu"``.
* the model-parallel RNG tracker saves and restores the *CUDA* generator around dropout;
  on CPU the tracker below swaps the CPU generator instead.
* the default causal attention mask is built with ``device="cuda"``; it is rebuilt on CPU.
* the pipeline schedules count tokens in ``torch.zeros(..., device="cuda")``; the schedules
  module sees a ``torch`` whose ``zeros`` maps that device to the CPU.
* router gating calls ``te_general_gemm`` when Transformer Engine is absent, a name 0.16.1
  never defines without TE (NameError); it is defined as ``None`` so the torch path is used.

Call :func:`apply` once before building a model. Everything else in the plugin is
device-agnostic and takes its device from :func:`default_device`.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_MODEL_PARALLEL_RNG = "model-parallel-rng"  # tensor_parallel.random._MODEL_PARALLEL_RNG_TRACKER_NAME
_applied = False


def default_device() -> torch.device:
    """The device this process computes on: its current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """``nccl`` on CUDA machines, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def apply() -> None:
    """Install the CPU shims (idempotent; no-op on CUDA machines)."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    schedules.torch = _TorchOnCpu()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker, keeping named states of the CPU generator."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG state {name!r} / seed {seed} already registered")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = _MODEL_PARALLEL_RNG):
            if name not in self.states_:
                raise KeyError(f"RNG state {name!r} was never added")
            outside = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outside)

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True


class _TorchOnCpu:
    """``torch`` for a module that hard-codes ``device="cuda"`` in ``torch.zeros``."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs) -> torch.Tensor:
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def manual_seed(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker the way Megatron-LM does."""
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        return
    apply()
    torch.manual_seed(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    # Same offset Megatron uses, so CPU and GPU runs draw dropout masks from the same seed.
    tracker.add(_MODEL_PARALLEL_RNG, seed + 2718)
