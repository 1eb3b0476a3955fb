"""Update rules of increlora, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
