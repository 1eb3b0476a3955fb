"""Method components. Importing this package registers every adapter, initializer, optimizer and
procedure; adding a method means adding its file and one import line here."""

from lorabench.methods.adapters import lora  # noqa: F401
from lorabench.methods.adapters import adalora, miss, randlora, vera  # noqa: F401
from lorabench.methods.initializers import corda, eva, lora_ga, olora, pissa, quantized  # noqa: F401
from lorabench.methods.optimizers import lorafa, loraplus  # noqa: F401
from lorabench.methods.procedures import adalora as adalora_procedure  # noqa: F401
from lorabench.methods.optimizers import adamw, galore_torch  # noqa: F401
from lorabench.methods.optimizers import galore_family, projectors  # noqa: F401
