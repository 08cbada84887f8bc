from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron_swiftmoe",
    version="0.1.0",
    description=(
        "SwiftMoE for Megatron-Core: per-iteration expert replication with a statically "
        "sharded optimizer (arXiv 2504.19925)"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_swiftmoe", "megatron_swiftmoe.*"]),
    install_requires=[
        # A range the CPU build on disk (2.13.0) satisfies, so pip never pulls a CUDA build over it.
        "torch>=2.6",
        # Tested range (megatron_swiftmoe/core/versions.py): never downgrades a newer install.
        # On Python 3.11 pip picks 0.16.1, the newest release that declares 3.11 support.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "sentencepiece>=0.2",
        "PyYAML>=6",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # matplotlib: tests/test_reproduce.py checks the report's loss-curve PNG.
        "test": ["pytest>=8", "hypothesis>=6", "matplotlib"],
        # Megatron-LM's own training code (megatron.training), for the --swiftmoe plugin.
        "megatron-lm": ["six", "regex", "pydantic", "psutil"],
        # GPU clusters only (need CUDA to build/run); apex is built from source, see README.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "pretrain_gpt=megatron_swiftmoe.training.pretrain_gpt:main",
            "swiftmoe-preprocess-data=megatron_swiftmoe.training.preprocess_data:main",
        ]
    },
)
