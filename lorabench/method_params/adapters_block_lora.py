"""Block-LoRA's hyper-parameters (adapter ``block_lora``, lorabench/methods/adapters/block_lora.py);
torch-free.

Defaults (ours: no released code, and only the paper's abstract could be read here): 8 blocks (the
title's "eight arms") of rank 1, i.e. a rank-8 LoRA split into 8 rank-1 blocks, and alpha 16, so the
scale s = alpha / (blocks x rank) = 2 is LoRA's preset scale at rank 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive
from lorabench.method_params.registry import params_for

# how the LoRA factors are split into blocks that share one down-projection (see block_lora.py):
# rank: Delta W = s sum_i B_i A (the rank dimension is split; the most literal reading of the abstract)
# input: Delta W x = s sum_i B_i A x_i (the input is split into n chunks x_i; the catalogue's reading)
PARTITIONS = ("rank", "input")


@params_for("adapter", "block_lora")
@dataclass
class BlockLoraParams:
    rank: int = 1  # r: rank of each block (rows of the shared A, columns of every B_i)
    alpha: float = 16.0  # s = alpha / (blocks x rank): LoRA's alpha / r of the unsplit rank n r
    block_lora_blocks: int = 8  # n: blocks B_1..B_n sharing the one down-projection A
    block_lora_partition: str = "rank"

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        check_positive("method.block_lora_blocks", self.block_lora_blocks)
        check_choice("method.block_lora_partition", self.block_lora_partition, PARTITIONS)

    @property
    def scale(self) -> float:
        return self.alpha / (self.block_lora_blocks * self.rank)
