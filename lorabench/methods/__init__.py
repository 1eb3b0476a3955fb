"""Method components. Importing this package registers every adapter, initializer, optimizer,
procedure and regularizer; adding a method means adding its file and its name to one of the lines below."""

# ruff: noqa: F401  (imported for their registration side effects)
from lorabench.methods.adapters import (  # peft-backed  # lorabench's own layers
    adalora,
    block_lora,
    codyra,
    dylora,
    flora,
    hydra_lora,
    increlora,
    inttune,
    lamda,
    loldu,
    lora,
    lora_sb,
    lora_xs,
    miss,
    nlora,
    nola,
    randlora,
    s2_lora,
    salt,
    sara,
    slora,
    sltrain,
    soma,
    sora,
    svfit,
    tlora,
    vera,
    wara,
    xlora,
)
from lorabench.methods.initializers import corda, eva, lora_ga, olora, pissa, quantized
from lorabench.methods.optimizers import (
    adamw,
    allora,
    dct_adamw,
    galore_family,
    galore_torch,
    lora_pro,
    lorafa,
    loraplus,
    q_galore,
)
from lorabench.methods.procedures import adalora as adalora_procedure
from lorabench.methods.procedures import badam, diffora, flexora, lisa, module_selection
from lorabench.methods.procedures import codyra as codyra_procedure
from lorabench.methods.procedures import dylora as dylora_procedure
from lorabench.methods.procedures import increlora as increlora_procedure
from lorabench.methods.procedures import lamda as lamda_procedure
from lorabench.methods.procedures import sara as sara_procedure
from lorabench.methods.procedures import soma as soma_procedure
from lorabench.methods.procedures import sora as sora_procedure
from lorabench.methods.regularizers import alignguard, ba_lora, gradient_norm_penalty, mgpo, pego, s2_lora_l1
