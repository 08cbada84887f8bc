"""Lets megatron-core 0.16 run on CPU with gloo. Does nothing when CUDA is present.

megatron-core assumes a GPU in a few places that the MoE GPT path touches:

* ``torch.cuda.current_device()`` picks the device of buffers (router, attention masks,
  mappings). On CPU it raises, so it is made to return ``"cpu"``.
* the model-parallel RNG tracker saves and restores the *CUDA* generator around dropout;
  on CPU the tracker below swaps the CPU generator instead.
* the default causal attention mask is built with ``device="cuda"``; it is rebuilt on CPU.
* the pipeline schedules count tokens in ``torch.zeros(..., device="cuda")`` and the
  pipeline's point-to-point transfers synchronise CUDA: both modules see a ``torch`` whose
  CUDA maps to the CPU (:class:`_TorchOnCpu`).
* with pipeline stages and tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer``
  moves the word embedding with ``Tensor.cuda()`` before summing it across the first and last
  stage; while that method runs, ``Tensor.cuda()`` returns the tensor itself.
* router gating calls ``te_general_gemm`` when Transformer Engine is absent, a name 0.16.1
  never defines without TE (NameError); it is defined as ``None`` so the torch path is used.
* recompute (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``: ``--recompute-granularity
  full|selective``) saves and restores the CUDA generator's state next to the CPU one and the
  tracker's: on CPU there is no CUDA generator, so that part saves nothing and restores nothing
  (the CPU state and the tracker's named states, which the tracker below keeps on the CPU
  generator, are still restored). Output-discarding recompute (``CheckpointWithoutOutput``:
  ``moe_act``, ``layernorm``) always asks Transformer Engine whether FP8 is on; without TE it is
  told "off", by stand-ins for those three TE names.
* the stock all-to-all token dispatcher and the shared experts of ``--moe-shared-expert-overlap``
  run on side CUDA streams: their modules see :class:`_TorchOnCpu`, whose streams are inert and
  all the same stream (so the dispatcher moves nothing between streams).
* the interleaved (virtual-stage) pipeline schedule starts a stage's send and, before waiting
  for it, frees the sent tensor's storage (``deallocate_output_tensor``): NCCL has copied it by
  then in stream order, but gloo sends from a background thread that would read freed memory
  (garbage or NaN losses). On CPU the freed storages are kept alive until the schedule returns,
  when every send has been waited for.
* sequence parallelism with the local transformer implementation: Megatron's torch norms refuse
  it (only apex's and TE's norms mark their weights ``sequence_parallel``); on CPU the torch norm
  is built and its weights are marked the way apex's are, so that ``finalize_model_grads`` sums
  their gradients over the tensor-parallel ranks (each holds a slice of the sequence).

Call :func:`apply` once before building a model. Everything else in the plugin is
device-agnostic and takes its device from :func:`default_device`.

:func:`apply_megatron_lm` adds what Megatron-LM's own training code (``megatron.training``,
its optimizers, timers and checkpointing) needs on a machine without CUDA; see its docstring.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import sys
import types

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
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    schedules.torch = p2p_communication.torch = _TorchOnCpu()
    _keep_sent_outputs_until_the_schedule_ends(schedules)
    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer)
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
    # Recompute: no CUDA generator to save or restore (the CPU one and the tracker's are).
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    if not getattr(mcore_random, "HAVE_TE", True):
        mcore_random.FP8GlobalStateManager = types.SimpleNamespace(
            is_fp8_enabled=lambda: False, get_fp8_recipe=lambda: None)
        mcore_random.activation_recompute_forward = lambda *args, **kwargs: contextlib.nullcontext()
        mcore_random.fp8_autocast = lambda *args, **kwargs: contextlib.nullcontext()
    from megatron.core.transformer.moe import shared_experts, token_dispatcher

    token_dispatcher.torch = shared_experts.torch = _TorchOnCpu()
    _sequence_parallel_torch_norm()
    _applied = True


def _keep_sent_outputs_until_the_schedule_ends(schedules) -> None:
    """``deallocate_output_tensor`` keeping each freed storage referenced until the pipeline
    schedule that sent it returns."""
    kept = []
    deallocate = schedules.deallocate_output_tensor

    def keep(out) -> None:  # a tensor, or (core_v0.19) a list or dict of them
        if isinstance(out, torch.Tensor):
            kept.append(out.data)  # shares the storage a gloo send may still be reading
        elif isinstance(out, (list, tuple, dict)):
            for item in out.values() if isinstance(out, dict) else out:
                keep(item)

    def deallocate_output_tensor(out, deallocate_pipeline_outputs=False):
        if deallocate_pipeline_outputs:
            keep(out)
        deallocate(out, deallocate_pipeline_outputs)

    def releasing_at_the_end(schedule):
        @functools.wraps(schedule)
        def run(*args, **kwargs):
            try:
                return schedule(*args, **kwargs)
            finally:
                kept.clear()

        return run

    schedules.deallocate_output_tensor = deallocate_output_tensor
    for name in ("forward_backward_pipelining_with_interleaving", "forward_backward_pipelining_without_interleaving"):
        setattr(schedules, name, releasing_at_the_end(getattr(schedules, name)))


def _sequence_parallel_torch_norm() -> None:
    """Let Megatron's torch ``LayerNorm`` / ``RMSNorm`` wrapper run with sequence parallelism: built
    without it, its weights marked ``sequence_parallel`` as apex's fused norms mark theirs."""
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, *args, **kwargs)
        config = copy.copy(config)
        config.sequence_parallel = False
        norm = original(cls, config, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)


def _tensor_cuda_is_identity(method):
    """``method`` with ``Tensor.cuda`` returning the tensor itself while it runs."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return wrapper


def _on_cpu(device):
    """``device`` with any CUDA device replaced by the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def wrapper(*args, device=None, pin_memory=False, **kwargs):
        return factory(*args, device=_on_cpu(device), **kwargs)

    return wrapper


class _Nothing:
    """Stands in for CUDA streams, events and the like: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def __eq__(self, other) -> bool:  # one CPU "stream": every stream is the current one
        return isinstance(other, _Nothing)

    def __hash__(self) -> int:
        return 0

    def record_event(self, *args, **kwargs) -> "_Nothing":
        return _Nothing()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _CudaOnCpu(types.SimpleNamespace):
    """``torch.cuda`` for Megatron-LM's training code on a machine without CUDA.

    One "device" (so that ``initialize_megatron`` builds its process groups), whose streams,
    events, caches and memory statistics are inert and whose RNG state is the CPU's.
    """

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    is_available = staticmethod(lambda: False)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: "cpu")
    set_device = synchronize = empty_cache = reset_peak_memory_stats = staticmethod(lambda *a, **k: None)
    Stream = Event = staticmethod(_Nothing)
    current_stream = default_stream = staticmethod(lambda *a, **k: _Nothing())
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    memory_stats = staticmethod(lambda *a, **k: {})
    memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = staticmethod(lambda *a, **k: 0)
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(lambda state, *a, **k: None)  # the CPU state is restored separately
    # No GPU architecture: compute capability 0.0 (Megatron's checks for Blackwell-or-newer and
    # for its grouped-GEMM kernels then take their pre-Ampere branch).
    get_device_capability = staticmethod(lambda *a, **k: (0, 0))
    get_device_properties = staticmethod(
        lambda *a, **k: types.SimpleNamespace(name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=0))


class _TorchOnCpu:
    """``torch`` for a module that hard-codes CUDA: factories map ``device="cuda"`` to the CPU,
    and ``torch.cuda`` is :class:`_CudaOnCpu`."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name: str):
        return getattr(torch, name)

    zeros = staticmethod(_cpu_factory(torch.zeros))
    ones = staticmethod(_cpu_factory(torch.ones))
    empty = staticmethod(_cpu_factory(torch.empty))
    full = staticmethod(_cpu_factory(torch.full))
    tensor = staticmethod(_cpu_factory(torch.tensor))
    arange = staticmethod(_cpu_factory(torch.arange))
    rand = staticmethod(_cpu_factory(torch.rand))
    randn = staticmethod(_cpu_factory(torch.randn))


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


# Modules of Megatron-LM's training code (and of megatron.core under it) that hard-code CUDA in
# tensor factories or torch.cuda calls: each sees a ``torch`` whose CUDA maps to the CPU.
_MEGATRON_LM_CUDA_MODULES = (
    "megatron.training.initialize",
    "megatron.training.training",
    "megatron.training.utils",
    "megatron.training.utils.common_utils",  # core_v0.19 on (get_device_arch_version)
    "megatron.training.checkpointing",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.training.models.dist_utils",  # core_v0.19 on
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.transformer.moe.moe_utils",  # track_moe_metrics when no layer logged an aux loss
)
_megatron_lm_applied = False


def apply_megatron_lm() -> None:
    """Make Megatron-LM's training code (``pretrain()``) run on CPU with gloo; no-op on CUDA.

    Shim by shim (each does nothing where CUDA exists):

    * :func:`apply` (the megatron.core shims above);
    * the modules in ``_MEGATRON_LM_CUDA_MODULES`` see :class:`_TorchOnCpu` as ``torch``:
      ``device="cuda"`` tensors are made on the CPU, ``torch.cuda.device_count()`` is 1 so
      that ``initialize_megatron`` builds its process groups and seeds the RNG tracker,
      streams/events/memory statistics are inert, ``torch.cuda.get_rng_state`` is the CPU's;
    * ``initialize_megatron`` gets ``allow_no_cuda=True``;
    * ``Tensor.cuda`` / ``Module.cuda`` return the CPU tensor / module (the batch loader and
      model setup call them unconditionally);
    * ``Tensor.type()`` names float tensors ``torch.cuda.*Tensor``, because the optimizers
      assert those names (``distrib_optimizer``, ``optimizer``, ``clip_grads``);
    * without triton (a GPU package), ``megatron.training.initialize`` imports a stand-in for
      the triton kernels of ``--batch-invariant-mode``, which then fails with that reason;
    * the distributed optimizer's state is initialised before a ``torch_dist`` load reads it
      (an ordering that only TE/apex optimizers tolerate), and after a load every parameter's
      Adam ``step`` is the checkpoint's (it kept the dummy initialisation's), and a torch-format
      parameter state, which has no ``step``, loads around it (without autograd: fp32 main
      parameters are views of the model's);
    * the fused CUDA kernels are not built, and a checkout without compiled dataset helpers
      uses those of the installed megatron-core wheel instead of running ``make``.
    """
    global _megatron_lm_applied
    if _megatron_lm_applied or torch.cuda.is_available():
        return
    _stub_batch_invariant_kernels()
    apply()
    import importlib

    for name in _MEGATRON_LM_CUDA_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # the list spans Megatron-LM versions
            continue
        module.torch = _TorchOnCpu()
    from megatron.training import initialize, training

    original_initialize = initialize.initialize_megatron

    @functools.wraps(original_initialize)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    initialize.initialize_megatron = training.initialize_megatron = initialize_megatron
    initialize._compile_dependencies = _load_dataset_helpers

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    cpu_type = torch.Tensor.type

    def cuda_style_type(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs:
            name = cpu_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.is_floating_point() else name
        return cpu_type(self, dtype, *args, **kwargs)

    torch.Tensor.type = cuda_style_type
    _init_distributed_optimizer_state_before_loading()
    _megatron_lm_applied = True


def _init_distributed_optimizer_state_before_loading() -> None:
    """Without TE/apex, ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads the
    Adam ``step`` of a state that is only initialised a few lines later; initialise it first,
    the way that method itself does (the loaded checkpoint then replaces the dummy values)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict

    original_load = DistributedOptimizer.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        # Without TE/apex the Adam step lives in each parameter's state; make every one the
        # checkpoint's step, each its own tensor (a shared one would be counted once per
        # parameter and step by torch's AdamW).
        steps = {group["step"] for group in state_dict["optimizer"]["param_groups"] if "step" in group}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                state["step"] = torch.tensor(step)

    DistributedOptimizer.load_state_dict = load_state_dict

    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original_set)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        # The torch-format parameter state has no ``step`` (TE/apex keep it elsewhere): copy the
        # tensors it has, keep the step that load_state_dict set. Under no_grad: with fp32
        # parameters the main parameter is a view of the model's, a leaf that requires grad.
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            with torch.no_grad():
                original_set(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


def _load_dataset_helpers() -> None:
    """Megatron-LM's ``_compile_dependencies`` without CUDA: only the dataset helpers.

    A checkout that has no compiled ``helpers_cpp`` borrows the one in the megatron-core wheel
    (same source), so that no compiler is needed.
    """
    name = "megatron.core.datasets.helpers_cpp"
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    try:
        files = importlib.metadata.files("megatron-core") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    built = [f for f in files if f.name.startswith("helpers_cpp") and f.suffix in (".so", ".pyd")]
    if not built:
        from megatron.core.datasets.utils import compile_helpers

        compile_helpers()
        return
    spec = importlib.util.spec_from_file_location(name, built[0].locate())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    importlib.import_module("megatron.core.datasets").helpers_cpp = module


def _stub_batch_invariant_kernels() -> None:
    """A stand-in for Megatron's triton batch-invariant kernels when triton is not installed."""
    if importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")

    def enable_batch_invariant_mode(*args, **kwargs):
        raise RuntimeError("--batch-invariant-mode needs triton (a CUDA package): pip install triton on a GPU machine")

    stub.enable_batch_invariant_mode = enable_batch_invariant_mode
    stub.is_batch_invariant_mode_enabled = lambda: False
    sys.modules.setdefault(stub.__name__, stub)
