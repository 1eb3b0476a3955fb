"""``protocol=continual``: a task sequence trained one stage after another, every task seen so far
evaluated after each stage; the record holds the accuracy matrix, average accuracy, backward
transfer and forgetting (lorabench.protocols.continual.metrics).

* protocol.py     the run body (lorabench.protocols registers it): stages, evaluation, record, resume
* tasks.py        each task's DatasetConfig (its preset, the run's sizes, its data folder)
* heads.py        one classification head per task (task-incremental), the adapter shared
* batches.py      a stage's micro-batches with replayed examples mixed in; the replay buffer
* strategies.py   STRATEGIES: sequential, replay, ilora (ilora.py: I-LoRA's rules)
* state.py        the stage checkpoint (resume=auto continues at the next stage)
* check.py        the torch-free config checks (lorabench.validate)

Importing this package does not import torch.
"""
