"""SwiftMoE for Megatron-Core: per-iteration expert replication, statically sharded optimizer.

Layout:

* :mod:`megatron_swiftmoe.core` — the strategy: placement (pure functions), token dispatcher,
  expert slots, MoE layer, sharded optimizer, settings, CPU shims.
* :mod:`megatron_swiftmoe.training` — this project's own training program (``pretrain_gpt``).
* :mod:`megatron_swiftmoe.megatron_lm` — the plugin for Megatron-LM's own ``pretrain_gpt.py``.
* :mod:`megatron_swiftmoe.sim` — the cost model.

Main pieces (imported lazily, so ``megatron_swiftmoe.core.placement`` needs no Megatron import):

* :class:`SwiftMoEConfig` — the strategy's settings.
* :func:`swiftmoe_spec` — turns a Megatron GPT layer/block spec into a SwiftMoE one.
* :class:`SwiftMoELayer` — the MoE layer (Megatron router, our dispatcher and expert slots).
* :class:`SwiftMoEOptimizer` — AdamW with static expert shards and per-iteration re-placement.
* ``compat`` and ``placement`` — the CPU shims and the placement functions.
"""

from importlib import import_module

_EXPORTS = {
    "SwiftMoEConfig": "megatron_swiftmoe.core.config",
    "SwiftMoELayer": "megatron_swiftmoe.core.layer",
    "swiftmoe_spec": "megatron_swiftmoe.core.layer",
    "SwiftMoEOptimizer": "megatron_swiftmoe.core.optimizer",
    "DynamicLossScaler": "megatron_swiftmoe.core.optimizer",
}
_MODULES = {"compat": "megatron_swiftmoe.core.compat", "placement": "megatron_swiftmoe.core.placement"}
__all__ = [*_EXPORTS, *_MODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return import_module(_MODULES[name])
    raise AttributeError(f"module 'megatron_swiftmoe' has no attribute {name!r}")
