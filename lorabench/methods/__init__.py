"""Method components. Importing this package registers every adapter, initializer, optimizer and
procedure; adding a method means adding its file and one import line here."""

from lorabench.methods.adapters import lora  # noqa: F401
from lorabench.methods.optimizers import adamw, galore_torch  # noqa: F401
