"""Update rules of lora_pro, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
