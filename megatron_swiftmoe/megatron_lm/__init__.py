"""SwiftMoE for Megatron-LM's own ``pretrain_gpt.py``: ``--swiftmoe`` on the user's command line.

Importing this package (the one line ``patches/apply.sh`` adds to ``pretrain_gpt.py``) binds
the plugin's wrappers into Megatron-LM (:mod:`.hooks`); they do nothing unless ``--swiftmoe``
is given. On a machine without CUDA it also applies the CPU shims of
:func:`megatron_swiftmoe.core.compat.apply_megatron_lm`, so that Megatron-LM runs on gloo.

* :mod:`.arguments` — the flag group and what SwiftMoE cannot run with;
* :mod:`.optimizer` — the expert optimizer, chained with Megatron's;
* :mod:`.checkpointing` — SwiftMoE state in both checkpoint formats, checks before loading;
* :mod:`.gradcheck` — non-finite expert gradients caught before any step;
* :mod:`.hooks` — where each piece plugs into ``pretrain()``.
"""

from megatron_swiftmoe.core import compat
from megatron_swiftmoe.megatron_lm import hooks

compat.apply_megatron_lm()
hooks.install()
