"""``protocol=compose``: one LoRA expert trained per task, then the experts combined by weight
averaging, task arithmetic, TIES, DARE and LoRA-LEGO, every combination scored on every task
(lorabench.protocols.compose.protocol; the merges: lorabench.protocols.compose.merges)."""
