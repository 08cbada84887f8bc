"""Print pip constraints (``name==version``) that pin the image's own torch stack.

An NGC PyTorch image ships torch (often a pre-release build such as ``2.10.0a0+...nv26.01``),
triton, Transformer Engine, apex, flash-attention, NVIDIA's CUDA libraries and the numpy they
were built against. ``pip install -c`` with these lines lets pip install everything else but never
replace one of them: where a package would need another version, pip stops with a conflict
instead of downloading a PyPI torch over the image's CUDA build.

    python docker/keep_image_packages.py > /opt/swiftmoe/image-packages.txt
"""

from __future__ import annotations

import importlib.metadata
import re

KEEP = re.compile(
    r"(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_.]engine.*|apex|flash[-_.]attn.*"
    r"|nvidia-.*|cuda-.*|cupy.*|numpy)",
    re.IGNORECASE,
)


def image_constraints() -> list[str]:
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and KEEP.fullmatch(name):
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(image_constraints()))
