"""Dataset families. Importing this package registers every dataset option."""

from lorabench.data import e2e, glue, gsm8k, metamathqa  # noqa: F401  (registration side effects)
