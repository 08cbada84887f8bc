"""``python -m megatron_swiftmoe.preprocess_data``: JSONL/TXT to a Megatron indexed dataset
(:mod:`megatron_swiftmoe.training.preprocess_data`)."""

from megatron_swiftmoe.training.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())
