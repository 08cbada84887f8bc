"""Which kernel the expert slots compute with (core/experts.py), on stand-in platforms: GPU
generations, torch releases with and without ``torch._grouped_mm``, Transformer Engine present or
not, CPU; the forced ``on`` that cannot run; and the Transformer Engine path's wiring, through a
stand-in ``GroupedLinear`` that implements TE's documented API with torch ops (TE and CUDA cannot
run here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from megatron_swiftmoe.core import experts as slot_kernels
from megatron_swiftmoe.core.experts import GroupedGemmUnavailable, SlotExperts, SlotPlatform, select_slot_kernel
from tests import gpt_models as gm
from tests.megatron_lm import REPO

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NGC_25_01 = "2.6.0a0+ecf3bae40a.nv25.01"  # no torch._grouped_mm


def gpu(name: str, capability: tuple[int, int], dtype=BF16, torch_version="2.9.0", grouped_mm=True, te=None,
        works=None, error="") -> SlotPlatform:
    return SlotPlatform("cuda", dtype, torch_version, has_grouped_mm=grouped_mm,
                        grouped_mm_works=grouped_mm if works is None else works, capability=capability,
                        device_name=name, transformer_engine=te, grouped_mm_error=error)


H100, A100, B200, L40S = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA B200", "NVIDIA L40S"
CPU = SlotPlatform("cpu", FP32, "2.13.0+cpu", has_grouped_mm=True, grouped_mm_works=True, device_name="CPU")


@pytest.mark.parametrize("mode,platform,kernel", [
    # Transformer Engine wherever it is installed on CUDA, whatever torch has (as Megatron's TEGroupedMLP).
    ("auto", gpu(A100, (8, 0), torch_version=NGC_25_01, grouped_mm=False, te="1.14.0"), "transformer_engine"),
    ("on", gpu(A100, (8, 0), torch_version=NGC_25_01, grouped_mm=False, te="1.14.0"), "transformer_engine"),
    ("auto", gpu(H100, (9, 0), te="2.8.0"), "transformer_engine"),
    ("auto", gpu(H100, (9, 0), dtype=FP16, te="2.8.0"), "transformer_engine"),
    ("on", gpu(H100, (9, 0), dtype=FP32, te="2.8.0"), "transformer_engine"),
    # torch._grouped_mm where torch has fast kernels (Hopper, data-centre Blackwell) in bf16.
    ("auto", gpu(H100, (9, 0)), "torch_grouped_mm"),
    ("auto", gpu(B200, (10, 0)), "torch_grouped_mm"),
    # Older generations: torch._grouped_mm may run (probe) but computes group by group: auto loops,
    # on takes it.
    ("auto", gpu(A100, (8, 0)), "loop"),
    ("on", gpu(A100, (8, 0)), "torch_grouped_mm"),
    ("auto", gpu(L40S, (8, 9)), "loop"),
    # A torch without torch._grouped_mm (NGC 25.01) and no TE: the loop.
    ("auto", gpu(A100, (8, 0), torch_version=NGC_25_01, grouped_mm=False), "loop"),
    ("auto", gpu(H100, (9, 0), torch_version=NGC_25_01, grouped_mm=False), "loop"),
    # A probe that failed (e.g. a release without this GPU's kernels) rules torch._grouped_mm out.
    ("auto", gpu(H100, (9, 0), works=False, error="RuntimeError: no kernel image"), "loop"),
    # fp16 / fp32 without TE: torch's fast grouped kernels are bf16.
    ("auto", gpu(H100, (9, 0), dtype=FP16), "loop"),
    ("auto", gpu(H100, (9, 0), dtype=FP32), "loop"),
    ("on", gpu(H100, (9, 0), dtype=FP32), "torch_grouped_mm"),
    # CPU: the loop unless forced (torch 2.13's CPU torch._grouped_mm runs).
    ("auto", CPU, "loop"),
    ("on", CPU, "torch_grouped_mm"),
    # off: always the loop.
    ("off", gpu(H100, (9, 0), te="2.8.0"), "loop"),
    ("off", CPU, "loop"),
])
def test_kernel_selection(mode, platform, kernel):
    choice = select_slot_kernel(mode, platform)
    assert choice.name == kernel, choice
    assert choice.reason and slot_kernels.KERNEL_LABELS[kernel] in choice.describe()


def test_auto_says_why_it_loops():
    old_torch = select_slot_kernel("auto", gpu(A100, (8, 0), torch_version=NGC_25_01, grouped_mm=False))
    assert f"torch {NGC_25_01} has no torch._grouped_mm" in old_torch.reason
    assert "Transformer Engine is not installed" in old_torch.reason and "compute capability 8.0" in old_torch.reason
    assert "no fast kernel for this GPU generation" in select_slot_kernel("auto", gpu(A100, (8, 0))).reason
    assert "no kernel image" in select_slot_kernel("auto", gpu(H100, (9, 0), works=False,
                                                                 error="RuntimeError: no kernel image")).reason


@pytest.mark.parametrize("platform,names", [
    (gpu(A100, (8, 0), torch_version=NGC_25_01, grouped_mm=False),
     [f"torch {NGC_25_01} has no torch._grouped_mm", A100, "compute capability 8.0", "Transformer Engine is not installed"]),
    (gpu(H100, (9, 0), works=False, error="RuntimeError: no kernel image is available"),
     ["torch._grouped_mm of torch 2.9.0 does not run here (RuntimeError: no kernel image is available)", H100]),
    (SlotPlatform("cpu", torch.float64, "2.5.1", has_grouped_mm=False, device_name="CPU"),
     ["torch 2.5.1 has no torch._grouped_mm", "CPU, float64", "Transformer Engine needs CUDA"]),
])
def test_forced_on_without_a_grouped_kernel_names_torch_gpu_and_fix(platform, names):
    with pytest.raises(GroupedGemmUnavailable) as error:
        select_slot_kernel("on", platform)
    message = str(error.value)
    assert message.startswith("--swiftmoe-grouped-gemm on: no grouped GEMM kernel runs on")
    for name in names:
        assert name in message
    assert "Fix: use --swiftmoe-grouped-gemm auto" in message and "install Transformer Engine" in message


def test_this_machine_probe_and_choice():
    rng = torch.get_rng_state()
    slot_kernels._probe_grouped_mm.cache_clear()
    platform = slot_kernels.slot_platform(torch.device("cpu"), FP32)
    assert torch.equal(torch.get_rng_state(), rng), "the probe must not draw from the global generator"
    assert platform.device_type == "cpu" and platform.transformer_engine is None and platform.capability is None
    assert platform.has_grouped_mm == hasattr(torch, "_grouped_mm")
    assert platform.grouped_mm_works == platform.has_grouped_mm  # torch 2.13 runs it on CPU
    with torch.no_grad():  # a first forward under no_grad must not make the probe fail
        slot_kernels._probe_grouped_mm.cache_clear()
        assert slot_kernels._probe_grouped_mm(torch.device("cpu"), BF16)[0] == platform.has_grouped_mm
    assert slot_kernels._probe_grouped_mm(torch.device("cpu"), torch.float64) == (
        False, "RuntimeError: Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")


def test_forced_on_is_refused_by_the_trainer_before_any_process_group(monkeypatch, capsys):
    from megatron_swiftmoe.training.arguments import parse_args

    monkeypatch.setattr(slot_kernels, "slot_platform", lambda device, dtype: SlotPlatform(
        "cpu", dtype, NGC_25_01, has_grouped_mm=False, device_name="CPU"))
    slot_kernels.slot_kernel.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--mock-data", "--swiftmoe-grouped-gemm", "on"], world_size=2)
        assert exit_.value.code == 2
        assert f"--swiftmoe-grouped-gemm on: no grouped GEMM kernel runs on CPU, float32, torch {NGC_25_01}" in (
            capsys.readouterr().err)
        parse_args(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--mock-data", "--swiftmoe-grouped-gemm", "auto"], world_size=2)
    finally:
        slot_kernels.slot_kernel.cache_clear()


class StandInGroupedLinear(torch.nn.Module):
    """Transformer Engine's documented ``transformer_engine.pytorch.GroupedLinear`` API, in torch ops:
    ``GroupedLinear(num_gemms, in_features, out_features, bias=..., params_dtype=..., device=...)``,
    parameters ``weight0 .. weight{n-1}`` of shape ``[out, in]``, ``forward(inp, m_splits)``."""

    calls = 0

    def __init__(self, num_gemms, in_features, out_features, bias=True, params_dtype=None, device="cuda", **kwargs):
        super().__init__()
        assert not bias and not kwargs
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(
                torch.empty(out_features, in_features, dtype=params_dtype, device=device)))

    def forward(self, inp, m_splits, is_first_microbatch=None):
        type(self).calls += 1
        assert len(m_splits) == self.num_gemms
        chunks = torch.split(inp, list(m_splits))
        return torch.cat([F.linear(chunk, getattr(self, f"weight{i}")) for i, chunk in enumerate(chunks)])


def test_transformer_engine_path_computes_with_the_slot_parameters(monkeypatch):
    """Selected on a (stand-in) CUDA platform with TE, the slots compute through TE's module with
    their own fc1/fc2 parameters: the same outputs and gradients as the loop, bit for bit, weights
    written by the optimizer seen on the next call, and no parameter of TE's in the model."""
    monkeypatch.setattr(slot_kernels, "slot_platform", lambda device, dtype: gpu(H100, (9, 0), dtype=dtype,
                                                                                   te="2.8.0 (stand-in)"))
    monkeypatch.setattr(slot_kernels, "_grouped_linear_class", lambda: StandInGroupedLinear)
    slot_kernels.slot_kernel.cache_clear()
    try:
        torch.manual_seed(0)
        config = gm.tiny_config(gated_linear_unit=True, activation_func=F.silu)
        loop, te = (SlotExperts(3, config, num_slots=3, grouped_gemm=mode) for mode in ("off", "on"))
        assert te.kernel(torch.device("cpu")).name == "transformer_engine"
        tokens_per_slot = torch.tensor([5, 0, 7])  # an empty slot included
        for step in range(2):  # new weights between the steps, as the optimizer writes them
            weights = torch.randn(3, loop.expert_numel)
            outputs = []
            for experts in (loop, te):
                experts.zero_grad(set_to_none=True)
                experts.load_flat(weights)
                x = torch.randn(12, config.hidden_size, generator=torch.Generator().manual_seed(step)).requires_grad_()
                y, bias = experts(x, tokens_per_slot)
                y.backward(torch.ones_like(y))
                outputs.append((y, x.grad, experts.fc1.grad, experts.fc2.grad))
            for a, b in zip(*outputs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert StandInGroupedLinear.calls == 4  # fc1 and fc2, two steps: the TE path ran
        assert [name for name, _ in te.named_parameters()] == ["fc1", "fc2"]
        assert te.state_dict() == {}
        assert all(getattr(module, "weight0") is None for module in te.__dict__["_te_slots"].modules)
    finally:
        slot_kernels.slot_kernel.cache_clear()
