"""Update rules of galore_family, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
