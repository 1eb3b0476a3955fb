"""Update rules of lora_optimizers, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
