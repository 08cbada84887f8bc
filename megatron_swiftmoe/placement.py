"""``megatron_swiftmoe.placement`` is :mod:`megatron_swiftmoe.core.placement`: the same module object, registered
under both names, so ``from megatron_swiftmoe.placement import ...`` and patches of either name agree."""

import sys

from megatron_swiftmoe.core import placement as _module

sys.modules[__name__] = _module
