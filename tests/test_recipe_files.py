"""Recipe files parse intact: no note, source or other text value is cut short by a ``#`` that YAML
reads as the start of a comment (every scalar inside ``protocol.notes`` and the paper entries must
run to the end of its line), and the printed protocol names the seeds the chosen scale runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorabench.reproduce import list_recipes, load_recipe, protocol_for

ROOT = Path(__file__).resolve().parent.parent


def recipe_paths() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*/recipe.yaml"))


def scalars(node, inside: bool = False):
    """(scalar node, whether it is a note or a paper entry's text) for every scalar of the document."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from scalars(value, inside or key.value in ("notes", "paper_numbers"))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from scalars(item, inside)
    elif isinstance(node, yaml.ScalarNode):
        yield node, inside


@pytest.mark.parametrize("path", recipe_paths(), ids=lambda p: p.parent.name)
def test_no_text_value_is_cut_by_a_comment(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    cut = []
    for node, is_text in scalars(yaml.compose(path.read_text(encoding="utf-8"))):
        if not is_text or node.style is not None or node.end_mark.line != node.start_mark.line:
            continue  # quoted and block scalars cannot hold a comment
        rest = lines[node.end_mark.line][node.end_mark.column :]
        if rest.lstrip().startswith("#"):
            cut.append(f"line {node.end_mark.line + 1}: {node.value!r} then {rest.strip()!r}")
    assert not cut, "text cut at '#' (quote it):\n" + "\n".join(cut)


def test_the_check_finds_a_cut_note(tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text("protocol:\n  notes:\n    - see issue #25 for why\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="see issue"):
        test_no_text_value_is_cut_by_a_comment(path)


@pytest.mark.parametrize("name", list_recipes())
def test_printed_protocol_names_the_seeds_the_scale_runs(name: str):
    recipe = load_recipe(name)
    for scale, body in recipe["scales"].items():
        protocol = protocol_for(recipe, scale)
        assert protocol["seeds"] == body["grid"]["seeds"]
        if body["grid"]["seeds"] != recipe["protocol"]["seeds"]:
            assert protocol["paper_seeds"] == recipe["protocol"]["seeds"]
