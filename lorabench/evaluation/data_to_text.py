"""E2E NLG Challenge metrics (Dušek et al., 2020) for multi-reference data-to-text generation.

Scores follow the conventions of the official E2E script (``tuetschek/e2e-metrics``):

* ``bleu`` (Papineni et al., 2002), in 0..1 as the script prints it (not 0..100): corpus BLEU-4 as
  mteval-v13a computes it, via sacrebleu: lowercased, 13a tokenization, n-gram counts clipped by
  their maximum count in any one reference, brevity penalty against the closest reference length.
* ``nist`` (Doddington, 2002), unbounded (about 8 on E2E): NIST-5 on the same tokens as the
  script's default (Perl) mteval-v13a: information weights counted over all references of the
  corpus, length penalty against all reference words over the mean number of references per output.
* ``meteor`` (METEOR 1.5, Denkowski & Lavie, 2014), in 0..1: the official jar's corpus score with
  ``-l en -norm``. It needs ``java`` on PATH and the jar that the pycocoevalcap package ships.
* ``rouge_l`` (Lin, 2004), in 0..1: per output, the F-measure with beta = 1.2 of the best LCS
  precision and the best LCS recall over its references (the MS-COCO caption evaluator's rule),
  averaged over outputs. LCS precision/recall come from rouge-score.
* ``cider`` (CIDEr-D, Vedantam et al., 2015), in 0..10: 1- to 4-gram tf-idf vectors with document
  frequencies from the evaluated references, clipped cosine similarity, Gaussian length penalty
  (sigma = 6), averaged over references and n, times 10, averaged over outputs. Its idf needs a
  corpus: with a single output every n-gram has idf 0 and CIDEr is 0.

METEOR, ROUGE-L and CIDEr run on lowercased Penn-Treebank-style tokens with punctuation dropped,
as in the official script. :func:`ptb_tokenize` reimplements the Stanford PTB tokenizer's output
for ordinary text; Stanford special-cases some tokens (e-mail or URL-like strings), where these
three scores can differ slightly from the official ones. On E2E-style data all five scores
matched the official script to the 4 decimals it prints.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from rouge_score import rouge_scorer, tokenizers
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_CLITIC = re.compile(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_PTB_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off by _CLITIC
    r"|[a-z](?:\.[a-z])+\."  # e.g.
    r"|\d+(?:[.,]\d+)+(?:-\d+(?:[.,]\d+)*)?"  # 3.5, 1,000, 2.5-3.5
    r"|\w+(?:-\w+)*"  # words, hyphenated compounds, 20-25
    r"|\.\.\.|--|\S"
)
_PUNCTUATION = frozenset(["'", "''", "`", "``", '"', ".", "?", "!", ",", ":", ";", "-", "--", "..."])
# Stanford's names for brackets; the official script keeps them (it filters only the upper-case names).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed in this environment; the message says why."""


def ptb_tokenize(text: str) -> list[str]:
    """Lowercased PTB-style tokens without punctuation (``isn't`` -> ``is n't``, ``£20`` -> ``£ 20``)."""
    text = _CLITIC.sub(r"\1 \2", text.lower().replace("\u2019", "'"))
    return [_BRACKETS.get(token, token) for token in _PTB_TOKEN.findall(text) if token not in _PUNCTUATION]


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in 0..1 (mteval-v13a conventions; see the module docstring)."""
    _check(hypotheses, references)
    width = max(len(refs) for refs in references)
    # sacrebleu takes one stream per reference position; None pads outputs with fewer references.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    scorer = BLEU(lowercase=True, tokenize="13a", smooth_method="none")
    return scorer.corpus_score(hypotheses, streams).score / 100


def nist(hypotheses: list[str], references: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 (mteval-v13a conventions; see the module docstring)."""
    _check(hypotheses, references)
    tokenize = Tokenizer13a()
    hyps = [tokenize(hyp.lower()).split() for hyp in hypotheses]
    refs = [[tokenize(ref.lower()).split() for ref in group] for group in references]

    ref_counts: Counter = Counter()  # the empty n-gram counts all reference words
    for group in refs:
        for ref in group:
            ref_counts[()] += len(ref)
            for n in range(1, max_n + 1):
                ref_counts.update(_ngrams(ref, n))

    score = 0.0
    for n in range(1, max_n + 1):
        gain, hyp_total = 0.0, 0
        for hyp, group in zip(hyps, refs):
            hyp_ngrams = _ngrams(hyp, n)
            best_ref: Counter = Counter()
            for ref in group:
                best_ref |= _ngrams(ref, n)
            for gram, hits in (hyp_ngrams & best_ref).items():
                gain += hits * math.log2(ref_counts[gram[:-1]] / ref_counts[gram])
            hyp_total += sum(hyp_ngrams.values())
        if hyp_total:
            score += gain / hyp_total

    hyp_len = sum(len(hyp) for hyp in hyps)
    # Average reference length as the official (edited mteval-v13a) script takes it:
    # all reference words over the mean number of references per output.
    ref_len = sum(len(ref) for group in refs for ref in group) * len(refs) / sum(len(g) for g in refs)
    ratio = hyp_len / ref_len if ref_len else 0.0
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    return score * math.exp(-_NIST_BETA * math.log(ratio) ** 2)


class _PTBTokenizer(tokenizers.Tokenizer):
    def tokenize(self, text: str) -> list[str]:
        return ptb_tokenize(text)


def rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean ROUGE-L F (beta 1.2) of best precision and best recall over references, in 0..1."""
    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_PTBTokenizer())
    total = 0.0
    for hyp, group in zip(hypotheses, references):
        scores = [scorer.score(ref, hyp)["rougeL"] for ref in group]
        precision = max(s.precision for s in scores)
        recall = max(s.recall for s in scores)
        if precision and recall:
            total += (1 + _ROUGE_BETA**2) * precision * recall / (recall + _ROUGE_BETA**2 * precision)
    return total / len(hypotheses)


def cider(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Mean CIDEr-D over outputs, in 0..10 (see the module docstring)."""
    _check(hypotheses, references)

    def counts(text: str) -> tuple[Counter, int]:
        tokens = ptb_tokenize(text)
        grams: Counter = Counter()
        for n in range(1, max_n + 1):
            grams.update(_ngrams(tokens, n))
        return grams, len(tokens)

    hyps = [counts(hyp) for hyp in hypotheses]
    refs = [[counts(ref) for ref in group] for group in references]
    doc_freq = Counter(gram for group in refs for gram in set().union(*(grams for grams, _ in group)))
    log_docs = math.log(len(refs))

    def tfidf(grams: Counter) -> tuple[list[dict], list[float]]:
        vectors: list[dict] = [{} for _ in range(max_n)]
        for gram, tf in grams.items():
            vectors[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        return vectors, [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]

    total = 0.0
    for (hyp_grams, hyp_len), group in zip(hyps, refs):
        hyp_vecs, hyp_norms = tfidf(hyp_grams)
        similarity = 0.0
        for ref_grams, ref_len in group:
            ref_vecs, ref_norms = tfidf(ref_grams)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))
            for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms):
                if hyp_norm and ref_norm:
                    dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in hyp_vec.items())
                    similarity += penalty * dot / (hyp_norm * ref_norm)
        total += 10.0 * similarity / (max_n * len(group))
    return total / len(hypotheses)


def find_java() -> str | None:
    """Path of the ``java`` executable on PATH, or None."""
    return shutil.which("java")


def find_meteor_jar() -> Path | None:
    """The METEOR 1.5 jar shipped by the pycocoevalcap package, or None if it is not installed."""
    spec = importlib.util.find_spec("pycocoevalcap")
    for root in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(root) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            return jar
    return None


def meteor(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 in 0..1 from the official jar; raises MetricUnavailable when it can't run.

    Starting the JVM and loading the paraphrase table takes about 10 s.
    """
    _check(hypotheses, references)
    java = find_java()
    if java is None:
        raise MetricUnavailable("java is not on PATH (METEOR 1.5 is a Java program)")
    jar = find_meteor_jar()
    if jar is None:
        raise MetricUnavailable("meteor-1.5.jar not found: install pycocoevalcap, which ships it")

    command = [java, "-Xmx2G", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as errors:
        try:
            with subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                encoding="utf-8",
            ) as proc:
                try:
                    # Stdio protocol: "SCORE ||| refs... ||| hyp" answers one line of statistics;
                    # "EVAL ||| stats ||| ..." answers one score per segment, then the corpus score.
                    stats = []
                    for hyp, group in zip(hypotheses, references):
                        texts = [" ".join(ptb_tokenize(text)) for text in (*group, hyp)]
                        stats.append(_meteor_ask(proc, " ||| ".join(["SCORE", *texts])))
                    proc.stdin.write(" ||| ".join(["EVAL", *stats]) + "\n")
                    proc.stdin.flush()
                    answers = [proc.stdout.readline() for _ in range(len(hypotheses) + 1)]
                    return float(answers[-1])
                finally:
                    proc.kill()
        except (OSError, ValueError) as exc:
            errors.seek(0)
            detail = errors.read().strip()[-500:] or str(exc)
            raise MetricUnavailable(f"METEOR jar failed: {detail}") from exc


def _meteor_ask(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().strip()
    if not answer:
        raise ValueError("METEOR closed its output")
    return answer


_SCORERS = {"bleu": bleu, "nist": nist, "meteor": meteor, "rouge_l": rouge_l, "cider": cider}


def e2e_metrics(hypotheses: list[str], references: list[list[str]]) -> tuple[dict[str, float | None], dict[str, str]]:
    """All five E2E scores, and ``metric -> reason`` for each that could not be computed here.

    A metric that could not be computed scores None (never 0). Scales are in the module docstring.
    """
    _check(hypotheses, references)
    scores: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    for name, scorer in _SCORERS.items():
        try:
            scores[name] = scorer(hypotheses, references)
        except MetricUnavailable as exc:
            scores[name] = None
            missing[name] = str(exc)
    return scores, missing
