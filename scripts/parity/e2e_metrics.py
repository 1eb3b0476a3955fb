"""`.venv/bin/python scripts/parity/e2e_metrics.py [--testset PATH]`

Runs the official E2E NLG Challenge scorer and lorabench's ``evaluation.data_to_text`` on the same
hypotheses and writes tests/fixtures/parity/e2e_metrics.json.

Reference: tuetschek/e2e-metrics@1b9c4d87fd0b (commit 1b9c4d87fd0bbb171ea966741cdc012588581ed4):
``measure_scores.py`` with ``mteval/mteval-v13a-sig.pl`` (BLEU, NIST; needs perl) and its copy of
pycocoevalcap (Stanford PTB tokenizer, METEOR 1.5, ROUGE-L, CIDEr; needs java). Set it up outside
the project:

    fetch github:tuetschek/e2e-metrics   (a bare git dir; extract the commit's files into
        /tmp/parity/e2e-metrics/src with `git ls-tree -r` + `git cat-file blob`; the snapshot lacks
        the three large blobs meteor/meteor-1.5.jar, meteor/data/paraphrase-en.gz and
        tokenizer/stanford-corenlp-3.4.1.jar: copy them from pip pycocoevalcap==1.2, whose files
        have the same git blob ids; this script checks the ids)
    .venv/bin/pip install --no-deps --target /tmp/parity/e2e-metrics/site future==1.0.0

(other folders: PARITY_E2E_SRC=..., PARITY_E2E_SITE=...). The scorer's pycocotools imports
scikit-image for mask drawing only; the worker stubs that import.

Cases:

* ``hard``: a small hand-written set (kept in the fixture with all texts): pounds, ``o'clock``,
  words ending ``.,``, ``5/5``, URLs and e-mail, accented capitals, brackets and quotes, a ``0``
  token, very short, long, all-capital and empty outputs. The fixture pins the official scores,
  its per-output METEOR/ROUGE-L/CIDEr and its PTB tokens, so tests/test_metrics.py checks ours
  without the reference (and without java for BLEU, NIST, ROUGE-L and CIDEr).
* ``test_perturbed`` and ``test_hard``: the official E2E test set (tuetschek/e2e-dataset@ab0d967dd572
  ``testset_w_refs.csv``, 630 MRs, 4,693 references; --testset, default
  ../shared/data/e2e/testset_w_refs.csv, else /tmp/parity/e2e-dataset/testset_w_refs.csv), read by
  the scorer from the CSV and by lorabench's E2E loader; outputs = the first reference of each MR,
  perturbed by a seeded rule (``test_hard`` adds the hard cases above). ``test_heldout_hard``
  scores such outputs against the other references of their MR only (MRs with two or more), as
  for a real system. Only the scores are kept.

The scorer's default (Perl) mteval prints BLEU and NIST with 4 decimals (its Python mteval, the
``-p`` option, is not used: it tokenizes differently); for the hard set the fixture also holds
mteval's BLEU and NIST of each output scored alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SRC = Path(os.environ.get("PARITY_E2E_SRC", "/tmp/parity/e2e-metrics/src"))
SITE = Path(os.environ.get("PARITY_E2E_SITE", "/tmp/parity/e2e-metrics/site"))
COMMIT = "1b9c4d87fd0bbb171ea966741cdc012588581ed4"
DATASET_COMMIT = "ab0d967dd5729ce455ef14ba9ffafc456a335264"
BLOBS = {  # git blob ids of the large files at COMMIT
    "pycocoevalcap/meteor/meteor-1.5.jar": "a833bc017bba3ceb07f3c251d5b4679e581255a3",
    "pycocoevalcap/meteor/data/paraphrase-en.gz": "88033c84fb2f8ecbc77fe57b7eee2913d1acd919",
    "pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar": "3cfa0a0ba01eb061f455d6478629e05fbcd68d97",
}
TESTSET_CANDIDATES = (
    ROOT.parent / "shared" / "data" / "e2e" / "testset_w_refs.csv",
    Path("/tmp/parity/e2e-dataset/testset_w_refs.csv"),
)
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
OFFICIAL_NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr"}

# -- the hand-written hard set --------------------------------------------------------------------
HARD = [
    (
        "name[The Eagle], eatType[coffee shop], priceRange[£20-25], near[Burger King]",
        [
            "The Eagle is a coffee shop near Burger King with prices of £20-25.",
            "Near Burger King, The Eagle coffee shop charges £20-25 per person.",
            "The Eagle, a coffee shop near Burger King, costs £20-£25.",
        ],
        "The Eagle coffee shop near Burger King costs £20-25.",
    ),
    (
        "name[Cotto], priceRange[more than £30], area[city centre]",
        ["Cotto in the city centre costs more than £30.", "Cotto is a city centre venue; expect over £30."],
        "Cotto, in the city centre, costs more than £30.,",
    ),
    (
        "name[The Mill], eatType[pub], food[English]",
        [
            "The Mill is an English pub that opens at 10 o'clock.",
            "Open from 10 o'clock, The Mill pub serves English food.",
        ],
        "The Mill pub serves English food from 10 o'clock .",
    ),
    (
        "name[Zizzi], customer rating[5 out of 5]",
        ["Zizzi is rated 5 out of 5.", "Customers rate Zizzi 5/5."],
        "Zizzi has a 5/5 rating from customers.",
    ),
    (
        "name[The Waterman], eatType[restaurant]",
        [
            "The Waterman is a restaurant, see www.thewaterman.co.uk for more.",
            "Visit http://thewaterman.example.com/menu to see The Waterman restaurant.",
        ],
        "The Waterman restaurant: www.thewaterman.co.uk/menu, or mail info@thewaterman.co.uk.",
    ),
    (
        "name[Éclair Blanc], eatType[café], area[riverside]",
        ["Éclair Blanc is a café by the riverside.", "By the riverside you will find the café Éclair Blanc."],
        "éclair blanc is a CAFÉ by the riverside.",
    ),
    (
        "name[Ölmühle], food[German], area[city centre]",
        ["Ölmühle serves German food in the city centre.", "In the city centre, Ölmühle offers German dishes."],
        "ÖLMÜHLE serves German food in the city centre.",
    ),
    (
        "name[Browns Cambridge], familyFriendly[yes], near[The Sorrento]",
        [
            "Browns Cambridge (near The Sorrento) is kids' friendly.",
            "Browns Cambridge, near The Sorrento, isn't adults-only: it's family-friendly.",
        ],
        "Browns Cambridge [near The Sorrento] is family friendly, isn't it?",
    ),
    (
        "name[The Punter], eatType[coffee shop], food[Italian]",
        ['"The Punter" is an Italian coffee shop.', "The Punter coffee shop serves Italian food."],
        "“The Punter” is a coffee shop with Italian food...",
    ),
    (
        "name[Fitzbillies], customer rating[0 out of 5]",
        ["Fitzbillies is rated 0 out of 5 by customers.", "Fitzbillies has a 0 out of 5 rating."],
        "Fitzbillies is rated 0 out of 5.",
    ),
    (
        "name[Aromi], eatType[pub]",
        ["Aromi is a pub.", "There is a pub called Aromi in the city."],
        "Aromi.",
    ),
    (
        "name[Clowns], eatType[pub], food[Japanese], priceRange[cheap], area[riverside], near[Café Sicilia]",
        [
            "Clowns is a cheap Japanese pub in the riverside area near Café Sicilia.",
            "Near Café Sicilia by the riverside is Clowns, a cheap pub serving Japanese food.",
        ],
        "Clowns is a pub. It serves Japanese food. It is cheap. It is in the riverside area. It is near "
        "Café Sicilia. Clowns is a cheap Japanese pub near Café Sicilia in the riverside area, and it is a pub.",
    ),
    (
        "name[Strada], eatType[restaurant], priceRange[high]",
        ["Strada is a high-priced restaurant.", "STRADA IS AN EXPENSIVE RESTAURANT."],
        "STRADA IS A HIGH PRICED RESTAURANT.",
    ),
    (
        "name[The Vaults], eatType[pub], priceRange[less than £20]",
        ["The Vaults is a pub with prices less than £20.", "The Vaults pub costs under £20."],
        "",
    ),
    (
        "name[Loch Fyne], food[seafood], near[The Rice Boat]",
        ["Loch Fyne serves seafood & drinks near The Rice Boat.", "Near The Rice Boat is Loch Fyne, a seafood place."],
        "Loch Fyne has seafood &amp; drinks -- near The Rice Boat; e.g. fish, etc.,",
    ),
    (
        "name[Green Man], eatType[pub], customer rating[3 out of 5]",
        ["The Green Man pub is rated 3.5/5 at 10:30 a.m.", "Green Man is a pub rated 3 out of 5."],
        "Green Man pub is rated 3.5/5 -- 1,000 visitors at 10:30 a.m.",
    ),
]


def testset_path(arg: str | None) -> Path | None:
    for path in [Path(arg)] if arg else TESTSET_CANDIDATES:
        if path.is_file():
            return path
    if arg:
        sys.exit(f"--testset {arg}: no such file")
    return None


def perturb(ref: str, rng: random.Random, vocabulary: list[str], hard: bool) -> str:
    """A plausible system output made from a reference by one seeded edit (plus a hard token)."""
    words = ref.split()
    op = rng.randrange(7)
    if op == 1 and len(words) > 3:
        del words[rng.randrange(len(words))]
    elif op == 2 and len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif op == 3:
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
    elif op == 4 and len(words) > 6:
        words = words[: max(3, int(len(words) * 0.6))]
    elif op == 5:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    elif op == 6:
        words = [w.lower() for w in words]
    text = " ".join(words)
    if not hard:
        return text
    extra = rng.randrange(12)
    if extra == 0:
        return text.rstrip(".") + " for £20-25."
    if extra == 1:
        return text.rstrip(".") + " and opens at 10 o'clock.,"
    if extra == 2:
        return text + " See www.e2e-example.co.uk/menu or mail info@e2e-example.com."
    if extra == 3:
        return "Éclair says: " + text.replace("e", "é", 1)
    if extra == 4:
        return text.upper()
    if extra == 5:
        return text.rstrip(".") + " (rated 5/5)."
    if extra == 6:
        return "“" + text + "” -- isn't it?"
    if extra == 7:
        return " ".join(text.split()[:2])
    if extra == 8:
        return text.replace("£", "GBP ") + " &amp; more..."
    return text


# -- the official scorer, in its own process ------------------------------------------------------
def check_reference() -> None:
    problems = []
    if not (SRC / "measure_scores.py").is_file():
        problems.append(f"no measure_scores.py under {SRC}")
    for rel, blob in BLOBS.items():
        path = SRC / rel
        if not path.is_file():
            problems.append(f"missing {path}")
            continue
        found = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True).stdout.strip()
        if found != blob:
            problems.append(f"{path}: git blob {found}, expected {blob} (the file at {COMMIT[:12]})")
    if not (SITE / "past").is_dir():
        problems.append(f"future not installed under {SITE}")
    for tool in ("java", "perl"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            problems.append(f"{tool} is not on PATH")
    if problems:
        sys.exit("official E2E scorer not ready:\n  " + "\n  ".join(problems) + "\nsee this script's docstring")


def official_worker(request_path: str, answer_path: str) -> None:
    """Runs inside a separate interpreter: the scorer's own modules on sys.path, nothing of ours."""
    import types

    sys.path[:0] = [str(SITE), str(SRC)]
    skimage, draw = types.ModuleType("skimage"), types.ModuleType("skimage.draw")
    draw.polygon = None
    skimage.draw = draw
    sys.modules.update({"skimage": skimage, "skimage.draw": draw})
    import measure_scores
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    assert Path(measure_scores.__file__).resolve().is_relative_to(SRC.resolve()), measure_scores.__file__
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    answers = {}
    for name, case in request.items():
        data_src, data_ref, data_sys = measure_scores.load_data(case["ref_file"], case["sys_file"])
        coco = measure_scores.run_coco_eval(data_ref, data_sys)
        mteval = measure_scores.run_mteval(data_ref, data_sys, data_src)
        scores = {**{k: float(v) for k, v in coco.eval.items()}, **mteval}
        answer = {"scores": {ours: scores[theirs] for ours, theirs in OFFICIAL_NAMES.items()}}
        answer["n_outputs"], answer["n_references"] = len(data_sys), sum(len(r) for r in data_ref)
        if case.get("details"):
            answer["segments"] = {
                ours: [float(coco.imgToEval[f"inst-{i}"][OFFICIAL_NAMES[ours]]) for i in range(len(data_sys))]
                for ours in ("meteor", "rouge_l", "cider")
            }
            # the evaluator tokenizes references and outputs in two calls, as here
            refs = PTBTokenizer().tokenize({i: [{"caption": ref} for ref in group] for i, group in enumerate(data_ref)})
            outs = PTBTokenizer().tokenize({i: [{"caption": out}] for i, out in enumerate(data_sys)})
            answer["ptb_references"] = [refs[i] for i in range(len(data_ref))]
            answer["ptb_hypotheses"] = [outs[i][0] for i in range(len(data_sys))]
            # mteval prints 4 decimals: each output alone as a one-segment corpus pins more of it
            answer["mteval_per_output"] = [
                measure_scores.run_mteval([refs_i], [out_i], [src_i])
                for refs_i, out_i, src_i in zip(data_ref, data_sys, data_src)
            ]
        answers[name] = answer
    Path(answer_path).write_text(json.dumps(answers), encoding="utf-8")


def run_official(cases: dict, tmp: Path) -> dict:
    request = {}
    for name, case in cases.items():
        sys_file = tmp / f"{name}.txt"
        sys_file.write_text("".join(h + "\n" for h in case["hypotheses"]), encoding="utf-8")
        ref_file = case.get("ref_file")
        if ref_file is None:
            ref_file = tmp / f"{name}_refs.csv"
            with ref_file.open("w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
                writer.writerow(["mr", "ref"])
                for mr, refs in zip(case["mrs"], case["references"]):
                    writer.writerows([mr, ref] for ref in refs)
        request[name] = {"ref_file": str(ref_file), "sys_file": str(sys_file), "details": case.get("details", False)}
    request_path, answer_path = tmp / "request.json", tmp / "answer.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, __file__, "--official-worker", str(request_path), str(answer_path)],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    if done.returncode:
        sys.exit(f"official scorer failed:\n{done.stderr[-3000:]}")
    return json.loads(answer_path.read_text(encoding="utf-8"))


# -- main --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testset", help="the official testset_w_refs.csv")
    parser.add_argument("--official-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        official_worker(*args.official_worker)
        return
    check_reference()

    from lorabench.data.e2e import group_by_mr, read_e2e_csv
    from lorabench.evaluation import data_to_text
    from tests.parity_case import write_fixture

    cases: dict = {
        "hard": {
            "mrs": [mr for mr, _, _ in HARD],
            "references": [refs for _, refs, _ in HARD],
            "hypotheses": [hyp for _, _, hyp in HARD],
            "details": True,
        }
    }
    testset = testset_path(args.testset)
    if testset is None:
        print("official test set not found (--testset): only the hard set is compared", file=sys.stderr)
    else:
        groups = group_by_mr(read_e2e_csv(testset))  # lorabench's reading of the file
        vocabulary = sorted({w for g in groups for ref in g["references"] for w in ref.split()})
        for name, hard in (("test_perturbed", False), ("test_hard", True)):
            rng = random.Random(0)
            cases[name] = {
                "ref_file": testset,
                "references": [g["references"] for g in groups],
                "hypotheses": [perturb(g["references"][0], rng, vocabulary, hard) for g in groups],
            }
        # a system-like case: the perturbed first reference scored against the other references
        heldout = [g for g in groups if len(g["references"]) > 1]
        rng = random.Random(1)
        cases["test_heldout_hard"] = {
            "mrs": [g["mr"] for g in heldout],
            "references": [g["references"][1:] for g in heldout],
            "hypotheses": [perturb(g["references"][0], rng, vocabulary, True) for g in heldout],
        }

    with tempfile.TemporaryDirectory(prefix="e2e-parity-") as tmp:
        official = run_official(cases, Path(tmp))

    comparison, fixture_cases = {}, {}
    for name, case in cases.items():
        ours, missing = data_to_text.e2e_metrics(case["hypotheses"], case["references"])
        if missing:
            sys.exit(f"{name}: lorabench could not compute {missing}")
        theirs = official[name]["scores"]
        comparison[name] = {
            "outputs": official[name]["n_outputs"],
            "references": official[name]["n_references"],
            "ours": ours,
            "official": theirs,
            "diff": {m: ours[m] - theirs[m] for m in METRICS},
            "equal_to_4_decimals": {m: f"{ours[m]:.4f}" == f"{theirs[m]:.4f}" for m in METRICS},
        }
        print(f"{name} ({official[name]['n_outputs']} outputs):")
        for m in METRICS:
            print(f"  {m:8s} ours {ours[m]:.6f}  official {theirs[m]:.6f}  diff {ours[m] - theirs[m]:+.2e}")
    hard = official["hard"]
    fixture_cases["hard"] = {
        "mrs": cases["hard"]["mrs"],
        "references": cases["hard"]["references"],
        "hypotheses": cases["hard"]["hypotheses"],
        "official": hard["scores"],
        "official_mteval_per_output": hard["mteval_per_output"],
        "official_segments": hard["segments"],
        "official_ptb_references": hard["ptb_references"],
        "official_ptb_hypotheses": hard["ptb_hypotheses"],
    }
    write_fixture(
        "e2e_metrics",
        {
            "reference": f"tuetschek/e2e-metrics@{COMMIT[:12]} measure_scores.py",
            "version": COMMIT,
            "produced_by": "scripts/parity/e2e_metrics.py",
            "testset": f"tuetschek/e2e-dataset@{DATASET_COMMIT[:12]} testset_w_refs.csv" if testset else None,
            "note": "BLEU and NIST come from mteval's printout (4 decimals); METEOR, ROUGE-L, CIDEr at full precision",
            "cases": fixture_cases,
            "comparison": comparison,
        },
    )


if __name__ == "__main__":
    main()
