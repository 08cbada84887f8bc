"""``python -m megatron_swiftmoe.pretrain_gpt``: the training program (:mod:`megatron_swiftmoe.training.pretrain_gpt`)."""

from megatron_swiftmoe.training.pretrain_gpt import main

if __name__ == "__main__":
    main()
