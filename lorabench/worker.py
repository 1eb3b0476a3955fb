"""Entry point of each process of a multi-process run (``lorabench train hardware=cpu_ddp2``).

``lorabench train`` resolves and validates the config once, writes it next to the run's record
and re-launches ``python -m lorabench.worker <launch_config.json>`` under ``accelerate launch``.
"""

from __future__ import annotations

import json
import sys

from lorabench.launch import run_one


def main() -> None:
    payload = json.loads(open(sys.argv[1], encoding="utf-8").read())
    raise SystemExit(run_one(payload["config"], payload["command"], multirun=False))


if __name__ == "__main__":
    main()
