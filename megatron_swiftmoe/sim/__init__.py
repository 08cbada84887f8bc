"""placeholder"""
from megatron_swiftmoe.sim.cluster import CLUSTERS, Cluster, get_cluster, load_cluster
from megatron_swiftmoe.sim.cost import STRATEGIES, calibrate_mfu, simulate
from megatron_swiftmoe.sim.model import ModelShape, load_model
from megatron_swiftmoe.sim.trace import Trace, load_trace
