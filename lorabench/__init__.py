"""lorabench: compare low-rank and memory-efficient fine-tuning methods under one loop."""

__version__ = "0.1.0"
