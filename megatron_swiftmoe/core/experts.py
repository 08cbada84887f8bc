"""Expert slots: S replicas of experts on one rank, and the kernel that computes them.

A slot holds the weights of whichever expert the current placement puts there; the
weights are written by the optimizer (never trained in place), so slots carry no identity
of their own and are not checkpointed: they are a cache of the layer's expert shards
(``SwiftMoELayer.expert_shard``), rebuilt after every load. Weight layout per slot follows Megatron's ``MLP`` (``[out, in]``), so an
expert's parameters map one-to-one onto a ``SequentialMLP`` expert's ``linear_fc1`` /
``linear_fc2`` weights.

Kernels (``--swiftmoe-grouped-gemm``): the slots' two matrix products run as

* ``transformer_engine``: Transformer Engine's grouped GEMM, through its documented module
  ``transformer_engine.pytorch.GroupedLinear(num_gemms, in_features, out_features, bias=False,
  params_dtype=..., device=...)`` and ``forward(inp, m_splits)``, as Megatron's ``TEGroupedMLP``
  uses it. The slot weights stay this module's ``fc1 [S, F1, H]`` / ``fc2 [S, H, F]`` parameters
  (the optimizer, checkpoints and exactness rely on them): the TE modules own no parameters,
  their per-GEMM weights ``weight0 .. weight{S-1}`` (TE's names, which Megatron's checkpoints
  of ``TEGroupedMLP`` also use) are bound to views of the slot parameters for each call, so the
  gradients reach ``fc1`` / ``fc2`` through autograd. **This path has not run on a GPU in this
  project**: its wiring is tested on CPU with a stand-in module that implements TE's API with
  torch ops (``tests/test_slot_kernels.py``).
* ``torch_grouped_mm``: one ``torch._grouped_mm`` per matrix product (torch >= 2.8; fast
  kernels on Hopper and data-centre Blackwell GPUs in bf16; CPU too).
* ``loop``: one ``F.linear`` per slot (any device and dtype).

:func:`select_slot_kernel` chooses among them from a :class:`SlotPlatform` (device type,
compute capability, dtype, torch version and whether ``torch._grouped_mm`` exists and runs,
Transformer Engine) and the mode: a pure function, driven with stand-in platforms in the tests.
:func:`slot_kernel` gathers the platform of a real device (with a one-time tiny probe of
``torch._grouped_mm`` per device and dtype) and caches the choice.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

KERNEL_LABELS = {
    "transformer_engine": "Transformer Engine grouped GEMM",
    "torch_grouped_mm": "torch._grouped_mm",
    "loop": "loop over slots",
}
#: Compute capability majors for which torch builds real grouped-GEMM kernels (Hopper, data-centre
#: Blackwell). Elsewhere ``torch._grouped_mm``, where it runs at all, computes group by group:
#: no faster than the loop, so ``auto`` does not pick it there.
GROUPED_MM_FAST_MAJORS = (9, 10)
_HALF = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class SlotPlatform:
    """What the kernel choice depends on.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: the dtype the slots compute in.
        torch_version: ``torch.__version__``.
        has_grouped_mm: ``torch._grouped_mm`` exists in this torch.
        grouped_mm_works: a tiny ``torch._grouped_mm`` forward and backward on this device and
            dtype gave the loop's result (``None``: not probed).
        capability: CUDA compute capability ``(major, minor)``; ``None`` elsewhere.
        device_name: e.g. ``"NVIDIA A100-SXM4-80GB"`` or ``"CPU"``.
        transformer_engine: Transformer Engine's version when ``transformer_engine.pytorch``
            imports with ``GroupedLinear`` (only looked for on CUDA), else ``None``.
        grouped_mm_error: why the probe failed, if it did.
    """

    device_type: str
    dtype: torch.dtype
    torch_version: str
    has_grouped_mm: bool
    grouped_mm_works: Optional[bool] = None
    capability: Optional[tuple[int, int]] = None
    device_name: str = ""
    transformer_engine: Optional[str] = None
    grouped_mm_error: str = ""

    def describe(self) -> str:
        where = self.device_name or self.device_type
        if self.capability is not None:
            where += f" (compute capability {self.capability[0]}.{self.capability[1]})"
        return f"{where}, {str(self.dtype).removeprefix('torch.')}, torch {self.torch_version}"


@dataclasses.dataclass(frozen=True)
class SlotKernel:
    """The chosen kernel (a key of :data:`KERNEL_LABELS`) and why."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"{KERNEL_LABELS[self.name]} ({self.reason})"


class GroupedGemmUnavailable(RuntimeError):
    """``--swiftmoe-grouped-gemm on`` where no grouped kernel runs."""


def select_slot_kernel(mode: str, platform: SlotPlatform) -> SlotKernel:
    """The fastest kernel that works for ``mode`` (``auto`` / ``on`` / ``off``) on ``platform``.

    ``off``: the loop. ``on``: Transformer Engine on CUDA if installed, else ``torch._grouped_mm``
    if it runs here (the probe), else :class:`GroupedGemmUnavailable` naming the torch version,
    the device and the fix. ``auto``: on CUDA in bf16/fp16, Transformer Engine if installed (as
    Megatron's ``TEGroupedMLP``), else ``torch._grouped_mm`` in bf16 on GPUs it has fast kernels
    for (:data:`GROUPED_MM_FAST_MAJORS`) where the probe passed, else the loop; the loop on CPU
    (measured faster there) and in fp32.
    """
    if mode == "off":
        return SlotKernel("loop", "--swiftmoe-grouped-gemm off")
    on_cuda = platform.device_type == "cuda"
    te = platform.transformer_engine if on_cuda else None
    grouped_mm_runs = platform.has_grouped_mm and platform.grouped_mm_works is not False
    if mode == "on":
        if te and platform.dtype in (*_HALF, torch.float32):
            return SlotKernel("transformer_engine", f"--swiftmoe-grouped-gemm on, Transformer Engine {te}")
        if platform.has_grouped_mm and platform.grouped_mm_works:
            return SlotKernel("torch_grouped_mm", f"--swiftmoe-grouped-gemm on, torch {platform.torch_version}")
        raise GroupedGemmUnavailable(_unavailable_message(platform))
    if mode != "auto":
        raise ValueError(f"--swiftmoe-grouped-gemm must be auto, on or off, got {mode!r}")
    if not on_cuda:
        return SlotKernel("loop", f"auto: {platform.device_type}, where the loop is faster")
    if platform.dtype not in _HALF:
        return SlotKernel("loop", f"auto: grouped kernels are used in bf16/fp16, this is {platform.describe()}")
    if te:
        return SlotKernel("transformer_engine", f"auto: Transformer Engine {te} on {platform.device_name or 'CUDA'}")
    fast = platform.capability is not None and platform.capability[0] in GROUPED_MM_FAST_MAJORS
    if grouped_mm_runs and fast and platform.dtype == torch.bfloat16:
        return SlotKernel("torch_grouped_mm", f"auto: {platform.describe()}")
    if not platform.has_grouped_mm:
        why = f"torch {platform.torch_version} has no torch._grouped_mm"
    elif platform.grouped_mm_works is False:
        why = f"torch._grouped_mm fails here ({platform.grouped_mm_error})"
    elif not fast:
        why = "torch._grouped_mm has no fast kernel for this GPU generation"
    else:
        why = "torch._grouped_mm is fast in bf16 only"
    return SlotKernel("loop", f"auto: {why} and Transformer Engine is not installed; {platform.describe()}")


def _unavailable_message(platform: SlotPlatform) -> str:
    if not platform.has_grouped_mm:
        grouped_mm = f"torch {platform.torch_version} has no torch._grouped_mm (added in torch 2.8)"
    else:
        grouped_mm = (f"torch._grouped_mm of torch {platform.torch_version} does not run here"
                      + (f" ({platform.grouped_mm_error})" if platform.grouped_mm_error else ""))
    if platform.device_type != "cuda":
        te = "Transformer Engine needs CUDA"
    elif platform.transformer_engine:
        te = f"Transformer Engine {platform.transformer_engine} does not compute in {platform.dtype}"
    else:
        te = "Transformer Engine is not installed"
    return (
        f"--swiftmoe-grouped-gemm on: no grouped GEMM kernel runs on {platform.describe()}: {grouped_mm}, and "
        f"{te}. Fix: use --swiftmoe-grouped-gemm auto (the fastest kernel that works here: the loop over slots), "
        "or install Transformer Engine (pip install --no-build-isolation 'transformer_engine[pytorch]'; NVIDIA's "
        "PyTorch containers include it), or a torch whose torch._grouped_mm supports this GPU (torch >= 2.8 on Hopper)."
    )


# --------------------------------------------------------------------------- the real platform


@functools.lru_cache(maxsize=None)
def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``torch._grouped_mm`` computes a tiny two-group product and its gradients on
    ``device`` in ``dtype`` exactly as separate products do (small integers: exact in any dtype).
    Draws from its own generator: the global random state is untouched."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "missing"
    try:
        # Its own graph, whatever the caller's mode (a first forward may run under no_grad or autocast).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            generator = torch.Generator().manual_seed(0)
            x = torch.randint(-2, 3, (32, 16), generator=generator).to(device, dtype).requires_grad_()
            w = torch.randint(-2, 3, (2, 16, 16), generator=generator).to(device, dtype).requires_grad_()
            offsets = torch.tensor([16, 32], dtype=torch.int32, device=device)
            out = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
            out.backward(torch.ones_like(out))  # contiguous: sum().backward() would hand in stride-0 grads
        with torch.no_grad():
            ones = torch.ones(16, 16, dtype=dtype, device=device)
            want = torch.cat([x[:16] @ w[0].T, x[16:] @ w[1].T])
            want_grad = torch.stack([ones @ x[:16], ones @ x[16:]])  # d sum(x w^T) / dw, per group
        if torch.equal(out.detach(), want) and torch.equal(w.grad, want_grad):
            return True, ""
        return False, "wrong results"
    except Exception as error:  # noqa: BLE001 - any failure means: not usable here
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return False, f"{type(error).__name__}: {message}"


@functools.lru_cache(maxsize=None)
def _transformer_engine() -> tuple[Optional[str], object]:
    """(version, ``transformer_engine.pytorch.GroupedLinear``), or (None, None) when TE does not import."""
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
    except Exception:  # noqa: BLE001 - absent or broken (e.g. built for another CUDA): not usable
        return None, None
    grouped_linear = getattr(te, "GroupedLinear", None)
    if grouped_linear is None:
        return None, None
    return str(getattr(transformer_engine, "__version__", "(unknown version)")), grouped_linear


def _grouped_linear_class():
    return _transformer_engine()[1]


def slot_platform(device: torch.device, dtype: torch.dtype) -> SlotPlatform:
    """The :class:`SlotPlatform` of ``device`` (probing ``torch._grouped_mm`` once per device and dtype)."""
    device = torch.device(device)
    capability = name = None
    te_version = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = tuple(torch.cuda.get_device_capability(index))
        name = torch.cuda.get_device_name(index)
        te_version = _transformer_engine()[0]
    works, error = _probe_grouped_mm(device, dtype)
    return SlotPlatform(
        device_type=device.type, dtype=dtype, torch_version=torch.__version__,
        has_grouped_mm=hasattr(torch, "_grouped_mm"), grouped_mm_works=works, capability=capability,
        device_name=name or device.type.upper(), transformer_engine=te_version,
        grouped_mm_error="" if error == "missing" else error,
    )


@functools.lru_cache(maxsize=None)
def slot_kernel(mode: str, device: torch.device, dtype: torch.dtype) -> SlotKernel:
    """The kernel the slots use for ``mode`` on ``device`` in ``dtype`` (cached; see
    :func:`select_slot_kernel`). Raises :class:`GroupedGemmUnavailable` for a forced ``on``
    where no grouped kernel runs."""
    return select_slot_kernel(mode, slot_platform(device, dtype))


def compute_device() -> torch.device:
    """The device this process will compute on, before any process group exists: CUDA device
    ``LOCAL_RANK`` (torchrun's) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def grouped_gemm_problem(mode: str, dtype: torch.dtype) -> Optional[str]:
    """For argument checks before any process group: the error message of a forced ``on``
    that cannot run on this process's device, else ``None``."""
    if mode != "on":
        return None
    try:
        slot_kernel(mode, compute_device(), dtype)
    except GroupedGemmUnavailable as error:
        return str(error)
    return None


class _TransformerEngineSlots:
    """fc1 and fc2 of every slot through two TE ``GroupedLinear`` modules that own no weights.

    Not registered as submodules: Megatron's DDP, optimizers and checkpoints never see them.
    Before each call, ``weight{i}`` of the module is bound to slot ``i``'s view of the parameter.
    """

    def __init__(self, grouped_linear, fc1: torch.Tensor, fc2: torch.Tensor):
        self.key = (fc1.device, fc1.dtype)
        self.modules = tuple(self._weightless(grouped_linear, weight) for weight in (fc1, fc2))

    @staticmethod
    def _weightless(grouped_linear, weight: torch.Tensor):
        num_gemms, out_features, in_features = weight.shape
        module = grouped_linear(num_gemms, in_features, out_features, bias=False, params_dtype=weight.dtype,
                                device=weight.device)
        for i in range(num_gemms):
            delattr(module, f"weight{i}")  # its own storage goes; the slots' views come per call
        return module

    def linear(self, which: int, x: torch.Tensor, weight: torch.Tensor, splits: list[int]) -> torch.Tensor:
        module = self.modules[which]
        for i, view in enumerate(weight.unbind(0)):
            setattr(module, f"weight{i}", view)
        try:
            return module(x, splits)
        finally:
            for i in range(len(splits)):
                setattr(module, f"weight{i}", None)  # hold no graph between calls


class SlotExperts(MegatronModule):
    """``num_slots`` expert MLPs (fc1 -> activation -> fc2, no bias) over slot-sorted tokens.

    Built the way Megatron builds its experts modules, ``SlotExperts(num_local_experts, config,
    pg_collection=..., num_slots=S)``: the first argument (how many experts a static layout
    would hold here) is not used; the slots hold replicas of whichever experts the placement
    puts there.

    ``grouped_gemm`` (``auto`` / ``on`` / ``off``) chooses the kernel per device and dtype
    (:func:`select_slot_kernel`); every kernel computes with the same two parameters:

    Parameters:
        fc1: ``[S, F1, H]`` with F1 = 2F for gated linear units (GLU), else F.
        fc2: ``[S, H, F]``.
    Both are flagged ``is_swiftmoe_slot`` so that optimizers keep them out of the dense path.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection=None,
        *,
        num_slots: int,
        grouped_gemm: str = "auto",
        device: torch.device | str | None = None,
        name: str | None = None,
    ):
        super().__init__(config=config)
        hidden = config.hidden_size
        ffn = config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        self.num_slots = num_slots
        self.grouped_gemm = grouped_gemm  # auto / on / off: the kernel is chosen per device and dtype
        kwargs = dict(dtype=config.params_dtype, device=device)
        self.fc1 = torch.nn.Parameter(torch.zeros(num_slots, fc1_out, hidden, **kwargs))
        self.fc2 = torch.nn.Parameter(torch.zeros(num_slots, hidden, ffn, **kwargs))
        for param in (self.fc1, self.fc2):
            param.is_swiftmoe_slot = True
        self._recompute_activation_if_asked()

    def _recompute_activation_if_asked(self) -> None:
        """``--recompute-modules moe_act``: as Megatron's grouped experts do, the activation's
        output is not kept for backward but recomputed from fc1's output
        (``CheckpointWithoutOutput``): its storage is freed once the forward pass has used it
        and refilled when the gradient reaches the experts' output."""
        config = self.config
        if config.recompute_granularity != "selective" or "moe_act" not in (config.recompute_modules or ()):
            return
        from megatron.core.tensor_parallel import CheckpointWithoutOutput

        plain, pending = self._activation, []

        def activation(x: torch.Tensor) -> torch.Tensor:
            checkpoint = CheckpointWithoutOutput()
            pending.append(checkpoint)
            return checkpoint.checkpoint(plain, x)

        def discard_after_forward(module, inputs, outputs) -> None:
            while pending:
                pending.pop().discard_output_and_register_recompute(outputs[0])

        self._activation = activation
        self.register_forward_hook(discard_after_forward)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Slots are a cache of the expert shards: nothing of theirs goes into a checkpoint."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("fc1", "fc2"):  # written by checkpoints of earlier versions
            state_dict.pop(prefix + name, None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}

    @property
    def expert_numel(self) -> int:
        """Number of parameters of one expert (one slot)."""
        return self.fc1[0].numel() + self.fc2[0].numel()

    def flat_slots(self, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
        """``[S, F1, H]``, ``[S, H, F]`` -> ``[S, P]``: one flat vector per slot."""
        return torch.cat([fc1.reshape(fc1.shape[0], -1), fc2.reshape(fc2.shape[0], -1)], dim=1)

    @torch.no_grad()
    def load_flat(self, weights: torch.Tensor) -> None:
        """Write ``weights [S, P]`` (one flat expert per slot) into the slot parameters."""
        split = self.fc1[0].numel()
        self.fc1.copy_(weights[:, :split].view_as(self.fc1))
        self.fc2.copy_(weights[:, split:].view_as(self.fc2))

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        # Same math as megatron.core.transformer.mlp.MLP's unfused path.
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)

    def kernel(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SlotKernel:
        """The kernel these slots use on ``device`` (default: the parameters' device, or this
        process's compute device while they are still on the CPU) in ``dtype`` (default: the
        parameters' dtype)."""
        if device is None:
            device = self.fc1.device if self.fc1.device.type != "cpu" else compute_device()
        return slot_kernel(self.grouped_gemm, torch.device(device), dtype or self.fc1.dtype)

    def _transformer_engine_slots(self) -> _TransformerEngineSlots:
        te = self.__dict__.get("_te_slots")
        if te is None or te.key != (self.fc1.device, self.fc1.dtype):
            te = _TransformerEngineSlots(_grouped_linear_class(), self.fc1, self.fc2)
            self.__dict__["_te_slots"] = te  # a plain attribute: not a submodule
        return te

    def forward(
        self,
        tokens: torch.Tensor,
        tokens_per_slot: torch.Tensor,
        permuted_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Run every slot's MLP on its tokens.

        Args:
            tokens: ``[T, H]``, sorted by slot.
            tokens_per_slot: ``[S]`` int, sums to T.
            permuted_probs: unused: the dispatcher applies router probabilities on combine.
        Returns:
            ``([T, H], None)`` (no bias), the interface of Megatron's experts modules.
        """
        kernel = slot_kernel(self.grouped_gemm, tokens.device, tokens.dtype).name
        if kernel == "torch_grouped_mm":
            # tokens_per_slot lives on the host (the dispatcher plans there): no sync to read it.
            offsets = torch.cumsum(tokens_per_slot, 0).to(torch.int32).to(tokens.device, non_blocking=True)
            hidden = torch._grouped_mm(tokens, self.fc1.transpose(1, 2), offs=offsets)
            return torch._grouped_mm(self._activation(hidden), self.fc2.transpose(1, 2), offs=offsets), None
        splits = tokens_per_slot.tolist()
        if kernel == "transformer_engine":
            te = self._transformer_engine_slots()
            hidden = te.linear(0, tokens, self.fc1, splits)
            return te.linear(1, self._activation(hidden), self.fc2, splits), None
        outputs = []
        # unbind: one backward node for all slots instead of S full-size indexing gradients.
        for chunk, fc1, fc2 in zip(torch.split(tokens, splits), self.fc1.unbind(0), self.fc2.unbind(0)):
            outputs.append(F.linear(self._activation(F.linear(chunk, fc1)), fc2))
        return torch.cat(outputs) if outputs else tokens[:0], None
