"""Federated fine-tuning on Flower's simulation engine (``protocol=federated``).

* :mod:`.partition`: IID and Dirichlet label-skewed splits of the training examples over clients;
* :mod:`.aggregation`: the server's aggregation rules as Flower strategies (FedAvg, FedSVD);
* :mod:`.privacy`: user-level differential privacy's noise multiplier and (epsilon, delta) from
  Opacus' RDP accountant;
* :mod:`.client`: the ClientApp: local training of the global adapter with the loop's pieces;
* :mod:`.protocol`: the run body: the ServerApp, rounds, evaluation, checkpoints and the record.
"""

from lorabench.console import quiet_libraries

# A simulation worker is a fresh process that imports this package first (to unpickle the ClientApp):
# the CLI's filters of library noise apply there too. torch-free.
quiet_libraries()
