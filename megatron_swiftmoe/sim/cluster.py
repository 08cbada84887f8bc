"""Cluster descriptions: GPUs, their compute rate, memory, links and collective latencies.

Units: the fields are in the units of vendor spec sheets (TFLOPS = 1e12 FLOP/s, GB/s = 1e9
bytes/s per direction, Gb/s = 1e9 bits/s, GB = 1e9 bytes, microseconds); the properties
convert to SI (FLOP/s, bytes/s, seconds). A custom cluster is a YAML file with the same keys
(see :func:`load_cluster`).

Sources of the shipped constants:

* A100 80GB (NVIDIA A100 Tensor Core GPU datasheet, 2021): 312 TFLOPS dense bf16/fp16 tensor
  core, 19.5 TFLOPS fp32 (non-tensor; PyTorch does not use TF32 for fp32 matmuls by default),
  80 GB HBM2e at 1,935 GB/s (PCIe card; the SXM card has 2,039 GB/s).
* The SwiftMoE paper's cluster (arXiv 2504.19925, evaluation setup): 16 nodes x 1 A100 80GB,
  PCIe 4.0 (32 GB/s per direction for x16) and a 100 Gb/s NIC per node.
* H100 SXM5 80GB (NVIDIA H100 Tensor Core GPU datasheet, 2023): 989 TFLOPS dense bf16 (1,979
  with 2:4 sparsity), 67 TFLOPS fp32, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s
  bidirectional per GPU = 450 GB/s per direction, PCIe 5.0 x16 (64 GB/s per direction).
  DGX/HGX H100 nodes have 8 GPUs and 8 ConnectX-7 400 Gb/s InfiniBand NDR ports, one per GPU
  (NVIDIA DGX H100 user guide), so each GPU has 50 GB/s per direction to other nodes.
* Latencies: NCCL's own cost model (``src/graph/tuning.cc``, NCCL 2.18-2.20): ring latency
  ``baseLat + (nsteps - nInterSteps) * intraLat + nInterSteps * interLat``; Simple protocol
  (large messages): baseLat 8.4 us, per-hop 3.4 us over NVLink, 5.7 us over PCIe, 14.0 us over
  the network; LL protocol (tiny messages): baseLat 6.6 us, per-hop 0.6 / 1.0 / 2.7 us, the
  intra-node hop x 1.8 when the ring spans nodes. Tree all-reduce (LL): baseLat 6.8 us +
  ``2 * ((ranks/nodes - 1) * intraLat + log2(nodes) * interLat)``, intraLat 0.6 (NVLink) /
  1.0 (PCIe), interLat 5.0 us. NCCL picks the faster of ring and tree for an all-reduce; the
  all-gather and reduce-scatter have only the ring (NVLS, CollNet and PAT are not modelled).

Bandwidths are the spec rates: achieved NCCL bus bandwidth is typically 80-95 % of them, so
modelled communication times are optimistic; write a cluster YAML with measured (nccl-tests
busbw) rates for tighter numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cluster", "CLUSTERS", "get_cluster", "load_cluster", "cluster_names"]


@dataclass(frozen=True)
class Cluster:
    """A homogeneous GPU cluster; ``num_gpus`` ranks, ``gpus_per_node`` per node."""

    name: str
    num_gpus: int
    gpus_per_node: int
    peak_tflops: float  # dense bf16/fp16 tensor-core rate per GPU
    fp32_tflops: float  # rate for fp32 models
    hbm_gb_s: float  # GPU memory bandwidth (optimizer step)
    memory_gb: float  # GPU memory
    pcie_gb_s: float  # GPU <-> host / NIC, per direction
    nic_gbit_s: float  # network bandwidth per GPU (its share of the node's NICs), per direction
    nvlink_gb_s: float | None = None  # GPU <-> GPU in a node, per direction; None: over PCIe
    base_latency_us: float = 8.4  # NCCL ring, Simple protocol
    intra_hop_us: float = 5.7  # per ring step inside a node (NVLink 3.4, PCIe 5.7)
    inter_hop_us: float = 14.0  # per ring step across nodes
    small_base_latency_us: float = 6.6  # NCCL ring, LL protocol (tiny messages)
    small_intra_hop_us: float = 1.0  # LL per step inside a node (NVLink 0.6, PCIe 1.0)
    small_inter_hop_us: float = 2.7  # LL per step across nodes
    tree_base_latency_us: float = 6.8  # NCCL tree all-reduce, LL protocol
    tree_intra_hop_us: float = 1.0  # LL tree step inside a node (NVLink 0.6, PCIe 1.0)
    tree_inter_hop_us: float = 5.0  # LL tree step across nodes
    description: str = ""

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name}: num_gpus and gpus_per_node must be >= 1")
        if self.num_gpus % self.gpus_per_node:
            raise ValueError(
                f"cluster {self.name}: num_gpus ({self.num_gpus}) must be a multiple of "
                f"gpus_per_node ({self.gpus_per_node})"
            )
        for field in ("peak_tflops", "fp32_tflops", "hbm_gb_s", "memory_gb", "pcie_gb_s", "nic_gbit_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"cluster {self.name}: {field} must be > 0, got {getattr(self, field)!r}")

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def intra_bw(self) -> float:
        """Bytes/s per direction between two GPUs of one node (NVLink, else PCIe)."""
        return (self.nvlink_gb_s if self.nvlink_gb_s else self.pcie_gb_s) * 1e9

    @property
    def inter_bw(self) -> float:
        """Bytes/s per direction from one GPU to other nodes: its NIC, behind PCIe."""
        return min(self.nic_gbit_s / 8, self.pcie_gb_s) * 1e9

    def flops(self, param_bytes: int) -> float:
        """Peak FLOP/s for a model whose parameters take ``param_bytes`` bytes (2: bf16/fp16)."""
        return (self.peak_tflops if param_bytes < 4 else self.fp32_tflops) * 1e12

    def ring_latency(self, ranks: int, nodes: int, allreduce: bool = False, small: bool = False) -> float:
        """Seconds of latency of a ring reduce-scatter / all-gather (or all-reduce) (NCCL's model)."""
        if ranks <= 1:
            return 0.0
        steps = 2 * (ranks - 1) if allreduce else ranks - 1
        inter = (2 * nodes if nodes > 1 else 0) if allreduce else nodes - 1
        base, intra_hop, inter_hop = self._latencies(small)
        if small and nodes > 1:
            intra_hop *= 1.8  # NCCL: LL's intra-node latency when the ring crosses nodes
        return (base + (steps - inter) * intra_hop + inter * inter_hop) * 1e-6

    def small_allreduce_latency(self, ranks: int, nodes: int) -> float:
        """Seconds of latency of a tiny all-reduce: the faster of NCCL's LL ring and LL tree."""
        if ranks <= 1:
            return 0.0
        intra = self.tree_intra_hop_us * (1.8 if nodes > 1 else 1.0)
        tree = self.tree_base_latency_us + 2 * ((ranks // nodes - 1) * intra
                                                + math.log2(nodes) * self.tree_inter_hop_us)
        return min(tree * 1e-6, self.ring_latency(ranks, nodes, allreduce=True, small=True))

    def a2a_latency(self, multi_node: bool) -> float:
        """Seconds of latency of one all-to-all: one step, all peers at once (a lower bound)."""
        base, intra_hop, inter_hop = self._latencies(False)
        return (base + (inter_hop if multi_node else intra_hop)) * 1e-6

    def _latencies(self, small: bool) -> tuple[float, float, float]:
        if small:
            return self.small_base_latency_us, self.small_intra_hop_us, self.small_inter_hop_us
        return self.base_latency_us, self.intra_hop_us, self.inter_hop_us

    def summary(self) -> str:
        intra = f"NVLink {self.nvlink_gb_s:g} GB/s" if self.nvlink_gb_s else f"PCIe {self.pcie_gb_s:g} GB/s"
        layout = f"{self.num_nodes} node{'s' * (self.num_nodes > 1)} x {self.gpus_per_node} GPU"
        return (
            f"{self.name}: {self.num_gpus} GPUs ({layout}), {self.peak_tflops:g} TFLOPS bf16 peak, "
            f"{self.memory_gb:g} GB, intra-node {intra if self.gpus_per_node > 1 else '-'}, "
            f"inter-node {self.inter_bw / 1e9:g} GB/s per GPU"
        )


_A100_PCIE = dict(peak_tflops=312.0, fp32_tflops=19.5, hbm_gb_s=1935.0, memory_gb=80.0)
_H100_SXM = dict(
    peak_tflops=989.0, fp32_tflops=67.0, hbm_gb_s=3350.0, memory_gb=80.0, pcie_gb_s=64.0,
    nic_gbit_s=400.0, nvlink_gb_s=450.0, intra_hop_us=3.4, small_intra_hop_us=0.6, tree_intra_hop_us=0.6,
)


def paper_a100_16() -> Cluster:
    """The SwiftMoE paper's testbed: 16 nodes x 1 A100 80GB, PCIe 4.0, 100 Gb/s NIC."""
    return Cluster(
        name="paper-a100-16", num_gpus=16, gpus_per_node=1, pcie_gb_s=32.0, nic_gbit_s=100.0,
        description="SwiftMoE paper (arXiv 2504.19925): 16 nodes x 1 A100 80GB, PCIe4 32 GB/s, 100 Gb/s NIC",
        **_A100_PCIE,
    )


def h100(num_gpus: int) -> Cluster:
    """HGX/DGX H100 nodes: 8 x H100 SXM, NVLink 4, one 400 Gb/s InfiniBand NDR NIC per GPU."""
    if num_gpus < 8 or num_gpus % 8:
        raise ValueError(f"h100-N needs N a multiple of 8 (8 GPUs per node), got {num_gpus}")
    return Cluster(
        name=f"h100-{num_gpus}", num_gpus=num_gpus, gpus_per_node=8,
        description="8 x H100 SXM per node, NVLink 4 (450 GB/s/dir), 8 x 400 Gb/s IB NDR per node",
        **_H100_SXM,
    )


#: Named clusters; any ``h100-<multiple of 8>`` works too.
CLUSTERS = {"paper-a100-16": paper_a100_16, **{f"h100-{n}": (lambda n=n: h100(n)) for n in (8, 16, 64, 256, 1024)}}


def cluster_names() -> list[str]:
    return list(CLUSTERS)


def load_cluster(path: str | Path) -> Cluster:
    """A cluster from a YAML file whose keys are :class:`Cluster`'s fields (``name`` optional).

    Example::

        name: my-a100-64
        num_gpus: 64
        gpus_per_node: 8
        peak_tflops: 312
        fp32_tflops: 19.5
        hbm_gb_s: 2039
        memory_gb: 80
        pcie_gb_s: 32
        nic_gbit_s: 200
        nvlink_gb_s: 300
        intra_hop_us: 3.4
        small_intra_hop_us: 0.6
    """
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a cluster file must be a YAML mapping of Cluster fields")
    fields = {f.name for f in dataclasses.fields(Cluster)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown cluster keys {unknown}; known: {sorted(fields)}")
    data.setdefault("name", path.stem)
    missing = sorted(
        f.name for f in dataclasses.fields(Cluster)
        if f.default is dataclasses.MISSING and f.name not in data
    )
    if missing:
        raise ValueError(f"{path}: missing cluster keys {missing}")
    return Cluster(**data)


def get_cluster(name: str) -> Cluster:
    """A named cluster (``paper-a100-16``, ``h100-<N>``) or a cluster YAML file."""
    if name in CLUSTERS:
        return CLUSTERS[name]()
    match = re.fullmatch(r"h100-(\d+)", name)
    if match:
        return h100(int(match.group(1)))
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_cluster(name)
    raise ValueError(f"unknown cluster {name!r}: use one of {cluster_names()}, h100-<N> (N a multiple of 8) "
                     "or a path to a cluster YAML file")

