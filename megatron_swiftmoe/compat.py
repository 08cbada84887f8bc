"""``megatron_swiftmoe.compat`` is :mod:`megatron_swiftmoe.core.compat`: the same module object, registered
under both names, so ``from megatron_swiftmoe.compat import ...`` and patches of either name agree."""

import sys

from megatron_swiftmoe.core import compat as _module

sys.modules[__name__] = _module
