"""Update rules of lamda, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
