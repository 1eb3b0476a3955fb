"""Update rules of projectors, one test per rule a surviving mutant showed unchecked (tests/MUTATION.md)."""
