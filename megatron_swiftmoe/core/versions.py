"""The megatron-core versions this plugin is tested with, checked once at import.

Everything else in the plugin follows the API it finds (e.g. layer specs are ``ModuleSpec``s
up to megatron-core 0.17 and ``functools.partial`` builders from 0.18 on), so this is the one
place that names versions. ``setup.py`` declares the same range.
"""

from __future__ import annotations

from packaging.version import Version

#: Oldest tested release, and the first release not yet tested (exclusive).
MEGATRON_CORE_RANGE = ("0.16.1", "0.20")


def check_megatron_core(version: str | None = None) -> Version:
    """The installed megatron-core's version; ImportError naming it if it is outside the range."""
    if version is None:
        from megatron.core import __version__ as version
    found = Version(version)
    low, high = (Version(v).release for v in MEGATRON_CORE_RANGE)
    if not low <= found.release < high:  # release tuples: 0.20.0rc1 is outside, as 0.20 is
        raise ImportError(
            f"megatron_swiftmoe supports megatron-core >= {MEGATRON_CORE_RANGE[0]}, < {MEGATRON_CORE_RANGE[1]}; "
            f"found {version}. Install a version in that range (pip install 'megatron-core>={MEGATRON_CORE_RANGE[0]},"
            f"<{MEGATRON_CORE_RANGE[1]}') or a megatron_swiftmoe release that supports {version}"
        )
    return found
