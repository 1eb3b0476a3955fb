"""pytest plugin for ``make mutation`` (``[tool.mutmut]`` in pyproject.toml loads it with ``-p``):
run the selected tests fastest first, so that a mutant dies on its cheapest failing test (mutmut
stops at the first failure). The durations are mutmut's own, from the stats file it writes in
mutants/ before it runs any mutant; without that file the order is left alone."""

from __future__ import annotations

import json
from pathlib import Path

STATS = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/


def pytest_collection_modifyitems(session, config, items) -> None:
    if not STATS.is_file():
        return
    durations = json.loads(STATS.read_text(encoding="utf-8")).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))  # stable: ties keep pytest's order
