"""The small federated, continual and compressed-base leaderboards: a few methods per protocol, seeds 0-2.

    .venv/bin/python scripts/protocol_leaderboard.py --track federated    # results/leaderboard/federated
    .venv/bin/python scripts/protocol_leaderboard.py --track continual    # results/leaderboard/continual
    .venv/bin/python scripts/protocol_leaderboard.py --track compressed   # results/leaderboard/compressed
    .venv/bin/python scripts/protocol_leaderboard.py --track federated --rows lora --seeds 0 --out /tmp/lb

Both start from Track A's setting (scripts/leaderboard.py: minilm_l6 = all-MiniLM-L6-v2, max length
128, global batch 16, linear schedule with 6% warm-up, the CPU preset) and each method's Track A
learning rate (its pick on centralised SST-2, not re-tuned for the protocol).

Federated (``FEDERATED``): GLUE SST-2's fixed 4,000-sentence training subset split over 4 clients by
a Dirichlet(0.5) label skew, 10 rounds of 6 local steps per client (4 x 60 = 240 client steps, about
Track A's 250), every client every round, the global model scored on the full dev set (872) after
each round; rounds to target at 80% accuracy. Rows: LoRA (FedAvg of A and B), FFA-LoRA (A frozen,
FedAvg of B), FedSVD (FFA-LoRA's clients, SVD re-factorisation at the server), DP-LoRA (LoRA with
user-level DP: clipping at 1.0 and Gaussian noise, epsilon 8 and 64 at delta 1e-5 over the 10 rounds).

Continual (``CONTINUAL``): SST-2 -> RTE -> MRPC (``../shared/data/glue/<TASK>``), a fixed 2,000-example
training subset of each, 100 steps per task, every task seen so far scored on its full dev set after
each stage. Rows: full fine-tuning, LoRA and DoRA trained sequentially, LoRA with experience replay
(64 examples per finished task, a quarter of each batch), and I-LoRA (replay plus a slow EMA adapter
with decay 0.99 and the fast/slow consistency loss; the slow weights are evaluated).

Compressed (``COMPRESSED``): Track A's SST-2 protocol (4,000 sentences, 250 steps, full dev set) on a
compressed MiniLM: every linear layer inside the 6 blocks compressed (36 matrices), the LoRA (r 8)
on all of them (query, key, value and the three dense projections) so that a compensation reaches
every compressed matrix, at LoRA's Track A rate (2e-3). Rows: QLoRA-style LoRA on an HQQ 4-bit base
(group 64), the same base with EoRA, LoftQ (one alternation, peft's default) and LQ-LoRA (at most
20 alternations, fewer than the reference's cap of 100 to bound the CPU time; its ILP gives a mean
of 3.25 bits per weight over 2/3/4/8-bit layers); LoRA on a 2:4-pruned base with EoRA, and LoRAM
(trained on the 2:4 base, scored on the original weights); WeLore (half of all ranks pruned, the
low-rank factors and the head fine-tuned at full fine-tuning's Track A rate, 2e-4).

Run it from the repository root (the data folders are relative to it). Runs go through
``lorabench train`` one after another, every row at seed 0 first, then seed 1, then seed 2 (a
federated run uses both cores through its simulated clients); a run whose completed record exists
is skipped and an interrupted one continues from its last round or stage (``resume=auto``), so the
script resumes. The table is written to ``<out>/../<track>_table.md`` by ``lorabench table
--protocol <track>``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DATA = "../shared/data/glue"
COMMON = [
    "model=minilm_l6",
    "dataset.max_length=128",
    "train=default",
    "train.global_batch_size=16",
    "train.warmup_ratio=0.06",
    "hardware=cpu",
    "hardware.micro_batch_size=16",
    "progress=false",
    "checkpoint.save_model=false",
    "resume=auto",  # an interrupted run continues after its last round or stage (not part of the run id)
]
FEDERATED_PROTOCOL = [
    "dataset=sst2",
    "dataset.train_size=4000",
    f"dataset.data_dir={DATA}/SST-2",
    "protocol=federated",
    "protocol.federated.clients=4",
    "protocol.federated.rounds=10",
    "protocol.federated.local_steps=6",
    "protocol.federated.partition=dirichlet",
    "protocol.federated.dirichlet_alpha=0.5",
    "protocol.federated.target=0.8",
]
FEDERATED = {  # row -> overrides (the Track A learning rates: lora 2e-3, ffa_lora 2e-2)
    "lora": ["method=lora", "train.lr=0.002"],
    "ffa_lora": ["method=ffa_lora", "train.lr=0.02"],
    "fedsvd": ["method=ffa_lora", "train.lr=0.02", "protocol.federated.aggregation=fedsvd"],
    "dp_lora_eps8": ["method=lora", "train.lr=0.002", "protocol.federated.dp_target_epsilon=8"],
    "dp_lora_eps64": ["method=lora", "train.lr=0.002", "protocol.federated.dp_target_epsilon=64"],
}
CONTINUAL_PROTOCOL = [
    "dataset=sst2",
    "dataset.train_size=2000",
    "protocol=continual",
    "protocol.continual.tasks=[sst2,rte,mrpc]",
    f"+protocol.continual.data_dirs={{sst2:{DATA}/SST-2,rte:{DATA}/RTE,mrpc:{DATA}/MRPC}}",
    "protocol.continual.steps_per_task=100",
]
CONTINUAL = {
    "full": ["method=full", "train.lr=0.0002"],
    "lora": ["method=lora", "train.lr=0.002"],
    "lora_replay": ["method=lora", "train.lr=0.002", "protocol.continual.strategy=replay"],
    "ilora": ["method=lora", "train.lr=0.002", "protocol.continual.strategy=ilora"],
    "dora": ["method=dora", "train.lr=0.002"],
}
COMPRESSED_PROTOCOL = [
    "dataset=sst2",
    "dataset.train_size=4000",
    f"dataset.data_dir={DATA}/SST-2",
    "train.max_steps=250",
    "train.eval_every=0",
    "protocol=compressed",
    "model.target_modules=[query,key,value,dense]",
]
HQQ4 = ["method=lora", "train.lr=0.002"]
TWO_OF_FOUR = [*HQQ4, "protocol.compressed.compressor=semi_structured"]
COMPRESSED = {
    "qlora_hqq4": HQQ4,
    "eora_hqq4": [*HQQ4, "protocol.compressed.compensation=eora"],
    "loftq_hqq4": [*HQQ4, "protocol.compressed.compensation=loftq"],
    "lq_lora_3.25bit": [
        *HQQ4,
        "protocol.compressed.compensation=lq_lora",
        "protocol.compressed.iterations=20",
        "protocol.compressed.bit_budget=3.25",
    ],
    "eora_2of4": [*TWO_OF_FOUR, "protocol.compressed.compensation=eora"],
    "loram_2of4": [*TWO_OF_FOUR, "protocol.compressed.recover=true"],
    "welore_50": ["method=full", "train.lr=0.0002", "protocol.compressed.compressor=welore"],
}
TRACKS = {
    "federated": (FEDERATED_PROTOCOL, FEDERATED),
    "continual": (CONTINUAL_PROTOCOL, CONTINUAL),
    "compressed": (COMPRESSED_PROTOCOL, COMPRESSED),
}


def overrides(track: str, row: str, seed: int, out: Path) -> list[str]:
    protocol, rows = TRACKS[track]
    return [*COMMON, *protocol, *rows[row], f"seed={seed}", f"results_dir={out}"]


def run(args: list[str]) -> int:
    cmd = [sys.executable, "-m", "lorabench.cli", "train", *args]
    print("[protocol-leaderboard]", " ".join(args), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--track", choices=sorted(TRACKS), required=True)
    parser.add_argument("--rows", nargs="*", help="rows to run (default: all of the track)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", help="results folder (default: results/leaderboard/<track>)")
    args = parser.parse_args(argv)
    rows = args.rows or list(TRACKS[args.track][1])
    unknown = [r for r in rows if r not in TRACKS[args.track][1]]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(TRACKS[args.track][1])}")
    out = Path(args.out or f"results/leaderboard/{args.track}")
    # seed-major: every row at seed 0 first, so an interrupted leaderboard has every row at n >= 1
    failed = [(r, s) for s in args.seeds for r in rows if run(overrides(args.track, r, s, out))]
    table = subprocess.run(
        [sys.executable, "-m", "lorabench.cli", "table", "--protocol", args.track, "--results-dir", str(out)],
        capture_output=True,
        text=True,
    )
    (out.parent / f"{args.track}_table.md").write_text(table.stdout)
    print(table.stdout)
    for row, seed in failed:
        print(f"[protocol-leaderboard] FAILED {row} seed {seed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
