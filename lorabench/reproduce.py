"""``lorabench reproduce <recipe>``: run a paper's grid and print ours beside theirs.

    lorabench reproduce --list
    lorabench reproduce galore_glue_roberta data_root=path/to/glue            # the paper's scale
    lorabench reproduce galore_glue_roberta scale=smoke data_root=path/to/glue  # seconds, on CPU
    lorabench reproduce peft_metamathqa_llama3 --dry-run                       # print the grid only

A recipe is ``recipes/<name>/recipe.yaml`` (see any of them for the schema):

* ``protocol``: seeds, which evaluation is reported (best or last), the split, the aggregate;
* ``scales``: ``full`` (the paper's setup) and ``smoke`` (tiny random model, a few steps): each has
  ``base`` overrides and a ``grid`` of named ``variants`` x named ``datasets`` x ``seeds``, all
  plain Hydra overrides of ``lorabench train``; ``{data_root}`` in an override is replaced by the
  ``data_root=DIR`` argument;
* ``paper_numbers``: the paper's values (in the table's units: metric x 100) with ``table``,
  ``source`` (the primary source, or the second-hand copy an unverified number came from) and
  ``status``, a ``model`` they belong to and ``match`` keys (dotted config paths) that select the variant;
* ``tolerance``: how far (in points) ours may be from a verified number and still count as
  reproduced.

Every grid point goes through ``lorabench.launch.run_one``, the function ``lorabench train -m`` calls
per job, into ``<results_dir>/<recipe>/`` (default ``results/recipes/<recipe>/``); finished runs
are skipped as in any sweep. Only numbers whose status starts with ``verified`` are shown as the
paper's; ``--include-unverified`` adds the others marked ``†`` (second-hand). Smoke-scale results
are never printed next to paper numbers.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from lorabench.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"
CONF_DIR = ROOT / "conf"
REQUIRED = ("name", "title", "paper", "protocol", "scales", "paper_numbers", "tolerance")
OPTIONS = ("scale", "data_root", "results_dir")
# recipe runs have their own results folder, so the plain ``lorabench table`` (results/runs) leaves
# them out; ``lorabench table --results-dir results/recipes/<name>`` shows one recipe's runs
RECIPE_RESULTS = "results/recipes"


def list_recipes() -> list[str]:
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.yaml"))


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = RECIPES_DIR / name / "recipe.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; valid choices: {', '.join(list_recipes())}")
    return path


def load_recipe(name: str) -> dict:
    recipe = yaml.safe_load(recipe_path(name).read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED if k not in (recipe or {})]
    if missing:
        raise ConfigError(f"recipe {name!r} lacks {missing}")
    for scale, body in recipe["scales"].items():
        grid = body.get("grid") or {}
        for key in ("variants", "datasets", "seeds"):
            if not grid.get(key):
                raise ConfigError(f"recipe {name!r} scale {scale!r}: grid.{key} is empty")
    for entry in recipe["paper_numbers"]:
        for key in ("method", "dataset", "model", "value", "table", "status", "source"):
            if key not in entry:
                raise ConfigError(f"recipe {name!r}: paper number {entry} lacks {key!r}")
    return recipe


def is_verified(entry: dict) -> bool:
    return str(entry.get("status", "")).lower().startswith("verified")


def paper_entries(recipe: dict, include_unverified: bool = False) -> list[dict]:
    """Entries the table may show: verified ones, and (marked †) second-hand ones if asked."""
    out = []
    for e in recipe["paper_numbers"]:
        if is_verified(e):
            out.append(e)
        elif include_unverified:
            out.append({**e, "table": f"{e['table']} †second-hand"})
    return out


def grid_points(
    recipe: dict, scale: str = "full", data_root: str | None = None, extra=(), results_dir: str = RECIPE_RESULTS
) -> list[tuple[str, list[str]]]:
    """[(point name, overrides)] for every variant x dataset x seed of ``scale``."""
    if scale not in recipe["scales"]:
        raise ConfigError(
            f"recipe {recipe['name']!r} has no scale {scale!r}; valid choices: {', '.join(recipe['scales'])}"
        )
    body = recipe["scales"][scale]
    grid = body["grid"]
    out_dir = str(Path(results_dir) / recipe["name"])
    points = []
    for vname, voverrides in grid["variants"].items():
        for dname, doverrides in grid["datasets"].items():
            for seed in grid["seeds"]:
                overrides = [
                    *body.get("base", []),
                    *voverrides,
                    *doverrides,
                    f"seed={seed}",
                    f"results_dir={out_dir}",
                    *extra,
                ]
                points.append((f"{vname}/{dname}/s{seed}", [_fill(o, data_root, recipe, scale) for o in overrides]))
    return points


def _fill(override: str, data_root: str | None, recipe: dict, scale: str) -> str:
    if "{data_root}" not in override:
        return override
    if not data_root:
        raise ConfigError(
            f"recipe {recipe['name']!r} (scale={scale}) reads local data: pass data_root=DIR "
            f"({recipe.get('data_root_help', 'the folder holding the datasets')})"
        )
    return override.replace("{data_root}", str(Path(data_root).expanduser().resolve()))


def compose(overrides: list[str]) -> dict:
    """The resolved config ``lorabench train <overrides>`` would run (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from lorabench.config_store import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _within(recipe: dict, table_paper: list[dict], results: Path) -> list[str]:
    """One line per verified paper number that has a matching result: ours, theirs, Δ, verdict."""
    from lorabench.results.table import SCALE, collect, paper_match, reported_value

    records = collect(results)[0]
    lines = []
    tol = float(recipe["tolerance"])
    for e in table_paper:
        if not is_verified(e):
            continue
        ours = [
            reported_value(r)
            for r in records
            if paper_match(
                e, r["method"]["label"], r["model"]["name"], r["dataset"]["name"], r["metrics"]["primary"], r
            )
        ]
        ours = [v * SCALE for v in ours if v is not None]
        if not ours:
            lines.append(f"  {e['method']:>12} {e['dataset']:<10} paper {e['value']:.2f} [{e['table']}]: no result yet")
            continue
        mean = sum(ours) / len(ours)
        verdict = "within" if abs(mean - e["value"]) <= tol else "OUTSIDE"
        lines.append(
            f"  {e['method']:>12} {e['dataset']:<10} ours {mean:.2f} (n={len(ours)}) "
            f"vs paper {e['value']:.2f} [{e['table']}]: Δ {mean - e['value']:+.2f}, {verdict} ±{tol}"
        )
    return lines


def protocol_for(recipe: dict, scale: str) -> dict:
    """The recipe's protocol as this scale runs it: the seeds are the scale grid's (a smoke grid may
    run fewer or other seeds than the paper's protocol states, which is kept as ``paper_seeds``)."""
    protocol = {k: v for k, v in recipe["protocol"].items() if k != "notes"}
    seeds = recipe["scales"][scale]["grid"]["seeds"]
    if seeds != protocol.get("seeds"):
        protocol = {**protocol, "seeds": seeds, "paper_seeds": protocol.get("seeds")}
    return protocol


def run_recipe(
    name: str,
    scale: str = "full",
    data_root: str | None = None,
    extra: list[str] | tuple[str, ...] = (),
    results_dir: str = RECIPE_RESULTS,
    dry_run: bool = False,
    include_unverified: bool = False,
    fmt: str = "md",
) -> int:
    from lorabench import launch
    from lorabench.results.table import build_table

    recipe = load_recipe(name)
    points = grid_points(recipe, scale, data_root, extra, results_dir)
    print(f"[lorabench] reproduce {recipe['name']} (scale={scale}): {recipe['title']}")
    print(f"[lorabench] protocol: {protocol_for(recipe, scale)}; {len(points)} runs")
    codes = []
    launch.SWEEP_SUMMARY.clear()
    for i, (point, overrides) in enumerate(points):
        command = "lorabench train " + shlex.join(overrides)
        if dry_run:
            print(f"  {point}: {command}")
            continue
        print(f"\n[lorabench] [{i + 1}/{len(points)}] {point}")
        try:
            cfg_dict = compose(overrides)
        except Exception as exc:  # noqa: BLE001 - hydra's own errors name the bad override
            launch.err(f"{point}: {str(exc).splitlines()[0]}")
            codes.append(2)
            continue
        codes.append(launch.run_one(cfg_dict, command, multirun=True))
    if dry_run:
        return 0
    out = Path(results_dir) / recipe["name"]
    comparable = scale == "full"
    paper = paper_entries(recipe, include_unverified) if comparable else None
    text, problems = build_table(out, fmt, paper=paper)
    for path, problem in problems:
        print(f"lorabench: skipped {path}: {problem}")
    print("\n" + text)
    if comparable:
        lines = _within(recipe, paper or [], out)
        if lines:
            print(f"\nVerified paper numbers (tolerance ±{recipe['tolerance']} points):")
            print("\n".join(lines))
        unverified = [e for e in recipe["paper_numbers"] if not is_verified(e)]
        if unverified and not include_unverified:
            print(
                f"\n{len(unverified)} second-hand (unverified) numbers not shown; --include-unverified shows them "
                "marked †."
            )
    else:
        print(f"\nscale={scale}: paper numbers are not shown; these runs are not comparable with the paper's.")
    failed = [r for r in launch.SWEEP_SUMMARY if r["status"] not in ("completed", "skipped")]
    for row in failed:
        print(f"  {row['status']:>9}  {row['run']}  ({row['error']})")
    return max(codes, default=0)


def reproduce_command(argv: list[str]) -> int:
    from lorabench.results.table import FORMATS

    parser = argparse.ArgumentParser(
        prog="lorabench reproduce",
        description="Run a paper recipe's grid and print ours beside theirs.",
        epilog="Arguments KEY=VALUE: scale=full|smoke, data_root=DIR, results_dir=DIR (runs go to DIR/<recipe>); "
        "any other KEY=VALUE is a Hydra override added to every run (e.g. hardware=gpu).",
    )
    parser.add_argument("recipe", nargs="?", help="recipe name (recipes/<name>/recipe.yaml) or a recipe.yaml path")
    parser.add_argument("args", nargs="*", help="scale=..., data_root=..., results_dir=..., Hydra overrides")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the grid's commands without running them")
    parser.add_argument(
        "--include-unverified", action="store_true", help="also show second-hand (unverified) paper numbers, marked †"
    )
    parser.add_argument("--format", default="md", choices=FORMATS)
    args = parser.parse_intermixed_args(argv)
    if args.list or not args.recipe:
        for name in list_recipes():
            print(f"{name:<28} {load_recipe(name)['title']}")
        return 0
    options = {"scale": "full", "data_root": None, "results_dir": RECIPE_RESULTS}
    extra = []
    for item in args.args:
        key, sep, value = item.partition("=")
        if sep and key in OPTIONS:
            options[key] = value
        else:
            extra.append(item)
    return run_recipe(
        args.recipe,
        options["scale"],
        options["data_root"],
        extra,
        options["results_dir"],
        args.dry_run,
        args.include_unverified,
        args.format,
    )
