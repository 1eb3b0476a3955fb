"""Update rules of soma, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
