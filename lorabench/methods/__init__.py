"""Method components. Importing this package registers every adapter, initializer, optimizer and
procedure; adding a method means adding its file and one import line here."""

from lorabench.methods.adapters import lora  # noqa: F401
from lorabench.methods.adapters import adalora, miss, randlora, vera  # noqa: F401
from lorabench.methods.adapters import dylora, flora, hydra_lora, increlora, inttune, lamda, loldu, lora_sb, lora_xs, nlora, nola, salt, slora, soma, sora, svfit; from lorabench.methods.procedures import dylora as dylora_procedure, increlora as increlora_procedure, lamda as lamda_procedure, sora as sora_procedure  # noqa: F401,E702
from lorabench.methods.initializers import corda, eva, lora_ga, olora, pissa, quantized  # noqa: F401
from lorabench.methods.optimizers import lorafa, loraplus  # noqa: F401
from lorabench.methods.procedures import adalora as adalora_procedure  # noqa: F401
from lorabench.methods.optimizers import adamw, galore_torch  # noqa: F401
from lorabench.methods.optimizers import galore_family, projectors  # noqa: F401
from lorabench.methods.optimizers import allora, lora_pro; from lorabench.methods.procedures import badam, lisa  # noqa: F401,E702
