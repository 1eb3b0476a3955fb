"""Dataset families. Importing this package registers every dataset option."""

from lorabench.data import glue, gsm8k  # noqa: F401  (registration side effects)
