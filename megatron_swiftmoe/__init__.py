"""SwiftMoE for Megatron-Core: per-iteration expert replication, statically sharded optimizer.

Main pieces (imported lazily, so ``megatron_swiftmoe.placement`` needs no Megatron import):

* :class:`SwiftMoEConfig` — the strategy's settings.
* :func:`swiftmoe_spec` — turns a Megatron GPT layer/block spec into a SwiftMoE one.
* :class:`SwiftMoELayer` — the MoE layer (Megatron router, our dispatcher and expert slots).
* :class:`SwiftMoEOptimizer` — AdamW with static expert shards and per-iteration re-placement.
"""

from importlib import import_module

_EXPORTS = {
    "SwiftMoEConfig": "megatron_swiftmoe.config",
    "SwiftMoELayer": "megatron_swiftmoe.layer",
    "swiftmoe_spec": "megatron_swiftmoe.layer",
    "SwiftMoEOptimizer": "megatron_swiftmoe.optimizer",
    "DynamicLossScaler": "megatron_swiftmoe.optimizer",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_swiftmoe' has no attribute {name!r}")
