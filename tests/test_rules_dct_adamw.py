"""Update rules of dct_adamw, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
