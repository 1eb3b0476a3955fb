"""Update rules of q_galore, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
