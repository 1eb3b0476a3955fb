"""Learning-rate tuning per method: the ladder search the leaderboard uses, and a pruned Optuna search.

    lorabench tune method=lora dataset=sst2 model=minilm_l6 --start 5e-4     # ladder search
    lorabench tune method=lora dataset=sst2 --search optuna --trials 12      # Optuna, pruned
    lorabench train -m hydra/sweeper=lr_optuna method=lora dataset=sst2      # Optuna via Hydra, unpruned

- ``ladder``: the rules, pure functions over {lr: metric} (start grid and neighbour check, edge
  extension, pick).
- ``search``: the ladder search driver (``tune``, ``run_rounds``) and its summary.
- ``halving``: the Optuna search, pruned by successive halving over training steps.
- ``runs``: running points through ``lorabench.launch.run_one`` and reading their records back;
  ``run_objective`` is what ``lorabench train``'s Hydra task returns to a sweeper.
- ``command``: ``lorabench tune``.
"""

from lorabench.tuning.ladder import (
    LR_LADDER,
    MAX_EDGE_STEPS,
    describe_pick,
    extend_grid,
    neighbour_above,
    pick_lr,
    start_grid,
)

__all__ = ["LR_LADDER", "MAX_EDGE_STEPS", "describe_pick", "extend_grid", "neighbour_above", "pick_lr", "start_grid"]
