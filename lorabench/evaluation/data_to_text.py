"""E2E NLG Challenge metrics (Dušek et al., 2020) for multi-reference data-to-text generation.

The five scores are those of the official E2E script (tuetschek/e2e-metrics ``measure_scores.py``)
and are checked against it by ``scripts/parity/e2e_metrics.py`` (fixture
``tests/fixtures/parity/e2e_metrics.json``):

* ``bleu`` (Papineni et al., 2002), in 0..1 as the script prints it: corpus BLEU-4 of the script's
  mteval-v13a. Tokens: :func:`mteval_tokenize`. Clipped n-gram matches (an n-gram counts at most
  its largest count in one reference), brevity penalty ``exp(min(0, 1 - r / c))`` with ``r`` the
  reference length closest to each output (the shorter on a tie; empty references skipped), and
  mteval's smoothing: the k-th order without any match gets precision ``1 / (2^k * n-grams)``.
* ``nist`` (Doddington, 2002), unbounded (about 8 on E2E): NIST-5 on the same tokens. An n-gram's
  information is ``log2(count of its (n-1)-word prefix / its count)`` over all references of the
  corpus (a unigram's prefix count is the number of reference words; as in the Perl script, a
  prefix that is the single token ``0`` also counts as empty). Length penalty
  ``exp(-beta * ln(ratio)^2)``, ``beta = -ln 0.5 / ln(1.5)^2``, where ratio = output words over
  reference words divided by the mean number of non-empty references per output.
* ``meteor`` (METEOR 1.5, Denkowski & Lavie, 2014), in 0..1: the official jar's corpus score with
  ``-l en -norm``, on PTB tokens.
* ``rouge_l`` (Lin, 2004), in 0..1: per output, the F-measure with beta = 1.2 of the best LCS
  precision and the best LCS recall over its references, averaged over outputs (tokens: the PTB
  string split at single spaces, as the MS-COCO evaluator does).
* ``cider`` (CIDEr-D, Vedantam et al., 2015), in 0..10: 1- to 4-gram tf-idf vectors with document
  frequencies over the evaluated references (idf ``ln(outputs) - ln(max(1, df))``), clipped cosine
  similarity, Gaussian length penalty (sigma = 6, on the difference of bigram counts), averaged over
  n and references, times 10, averaged over outputs. With a single output every idf is 0 and CIDEr
  is 0.

METEOR, ROUGE-L and CIDEr run on the tokens of the Stanford PTB tokenizer that the official
script uses: the ``stanford-corenlp-3.4.1.jar`` shipped by pycocoevalcap, run with
``-preserveLines -lowerCase`` (:func:`ptb_tokenize`), minus the tokens in ``PTB_PUNCTUATION``.
Without java or the jar these three scores are not computed: :func:`e2e_metrics` returns None for
them with the reason (no other tokenizer stands in). One deliberate difference: line breaks other
than ``\\n`` (``\\r``, form feed, U+2028...) become spaces before tokenizing; the official script
replaces only ``\\n``, and the jar then splits such a text into two lines, misaligning every later
output with its references.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import string
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

MAX_BLEU_N, MAX_NIST_N, MAX_CIDER_N = 4, 5, 4
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0

# -- mteval-v13a tokens -------------------------------------------------------------------------
# Perl's \s on character strings (Python's str.split() would also split at U+001C..U+001F).
_PERL_SPACE = re.compile(r"[\t\n\x0b\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_MTEVAL_SPLITS = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII symbols and punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)

# -- Stanford PTB tokens ---------------------------------------------------------------------------
PTB_JAR = "stanford-corenlp-3.4.1.jar"
PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# Tokens the MS-COCO evaluator drops. It lists the bracket names in upper case only, so the
# lower-cased -lrb-, -rrb-, -lsb-... of the jar stay in the text that is scored.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_JAR_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed in this environment; the message says why."""


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# -- BLEU and NIST (mteval-v13a) ------------------------------------------------------------------
def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's tokens: whitespace runs collapsed, ``&quot; &amp; &lt; &gt;`` decoded, ``A-Z``
    lower-cased (only those: ``É`` keeps its case), ASCII symbols split off, periods and commas
    split off unless between digits, a dash split off after a digit."""
    norm = _PERL_SPACE.sub(" ", text).replace("<skipped>", "")
    for entity, char in _ENTITIES:
        norm = norm.replace(entity, char)
    norm = f" {norm} ".translate(_ASCII_LOWER)
    for pattern, replacement in _MTEVAL_SPLITS:
        norm = pattern.sub(replacement, norm)
    norm = _PERL_SPACE.sub(" ", norm).strip(" ")
    return norm.split(" ") if norm else []


def _closest_length(ref_lengths: list[int], hyp_length: int) -> int:
    """mteval's closest reference length: the first reference's, replaced by each later non-empty
    reference that is closer to the output (or as close and shorter)."""
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length and (abs(hyp_length - length), length) < (abs(hyp_length - best), best):
            best = length
    return best


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in 0..1 (mteval-v13a with its smoothing; see the module docstring)."""
    _check(hypotheses, references)
    matches, totals, ref_length, hyp_length = [0] * MAX_BLEU_N, [0] * MAX_BLEU_N, 0, 0
    for hyp, group in zip(hypotheses, references):
        hyp_tokens = mteval_tokenize(hyp)
        ref_tokens = [mteval_tokenize(ref) for ref in group]
        hyp_length += len(hyp_tokens)
        ref_length += _closest_length([len(ref) for ref in ref_tokens], len(hyp_tokens))
        for n in range(1, MAX_BLEU_N + 1):
            best: Counter = Counter()
            for ref in ref_tokens:
                best |= _ngrams(ref, n)
            grams = _ngrams(hyp_tokens, n)
            matches[n - 1] += sum((grams & best).values())
            totals[n - 1] += max(len(hyp_tokens) - n + 1, 0)
    if hyp_length == 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for hits, total in zip(matches, totals):
        if total == 0:
            continue  # mteval counts an order without output n-grams as precision 1
        if hits == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * total))
        else:
            log_sum += math.log(hits / total)
    return math.exp(log_sum / MAX_BLEU_N) * math.exp(min(0.0, 1 - ref_length / hyp_length))


def nist(hypotheses: list[str], references: list[list[str]], max_n: int = MAX_NIST_N) -> float:
    """Corpus NIST-5 (mteval-v13a; see the module docstring)."""
    _check(hypotheses, references)
    hyps = [mteval_tokenize(hyp) for hyp in hypotheses]
    refs = [[mteval_tokenize(ref) for ref in group] for group in references]

    counts: Counter = Counter()
    ref_words = 0
    for group in refs:
        for ref in group:
            ref_words += len(ref)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(ref, n))

    def information(gram: tuple) -> float:
        prefix = gram[:-1]
        context = counts[prefix] if prefix and prefix != ("0",) else ref_words
        return math.log2(context / counts[gram])

    score = 0.0
    for n in range(1, max_n + 1):
        gain, hyp_total = 0.0, 0
        for hyp, group in zip(hyps, refs):
            best: Counter = Counter()
            for ref in group:
                best |= _ngrams(ref, n)
            for gram, hits in (_ngrams(hyp, n) & best).items():
                gain += hits * information(gram)
            hyp_total += max(len(hyp) - n + 1, 0)
        score += gain / max(hyp_total, 1)

    refs_per_output = sum(1 for group in refs for ref in group if ref) / len(refs)
    ratio = sum(len(hyp) for hyp in hyps) / (ref_words / refs_per_output)
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    return score * math.exp(-_NIST_BETA * math.log(ratio) ** 2)


# -- PTB tokens (the Stanford jar) ------------------------------------------------------------------
def find_java() -> str | None:
    """Path of the ``java`` executable on PATH, or None."""
    return shutil.which("java")


def _pycocoevalcap_file(*parts: str) -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    return None


def find_meteor_jar() -> Path | None:
    """The METEOR 1.5 jar shipped by the pycocoevalcap package, or None if it is not installed."""
    return _pycocoevalcap_file("meteor", "meteor-1.5.jar")


def find_ptb_jar() -> Path | None:
    """The Stanford CoreNLP 3.4.1 jar (PTB tokenizer) shipped by pycocoevalcap, or None."""
    return _pycocoevalcap_file("tokenizer", PTB_JAR)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Each text as the official script scores it: the Stanford PTB tokenizer's lower-cased tokens
    without ``PTB_PUNCTUATION``, joined by single spaces. One JVM run for all texts.

    Raises MetricUnavailable when java or the jar is missing or the tokenizer fails.
    """
    if not texts:
        return []
    java = find_java()
    if java is None:
        raise MetricUnavailable("java is not on PATH (the official PTB tokenizer is a Java program)")
    jar = find_ptb_jar()
    if jar is None:
        raise MetricUnavailable(f"{PTB_JAR} not found: install pycocoevalcap, which ships it")
    with tempfile.TemporaryDirectory(prefix="lorabench-ptb-") as tmp:
        source = Path(tmp) / "texts.txt"
        source.write_text("\n".join(_JAR_LINE_BREAKS.sub(" ", text) for text in texts), encoding="utf-8")
        command = [java, "-cp", str(jar), PTB_CLASS, "-preserveLines", "-lowerCase", str(source)]
        try:
            done = subprocess.run(command, capture_output=True, check=False)
        except OSError as exc:
            raise MetricUnavailable(f"PTB tokenizer could not start: {exc}") from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip()[-500:]
        raise MetricUnavailable(f"PTB tokenizer failed (exit {done.returncode}): {detail}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts) or any(line.strip() for line in lines[len(texts) :]):
        raise MetricUnavailable(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in lines[: len(texts)]]


def _tokenize_all(hypotheses: list[str], references: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    flat = ptb_tokenize([*hypotheses, *(ref for group in references for ref in group)])
    hyps, rest = flat[: len(hypotheses)], iter(flat[len(hypotheses) :])
    return hyps, [[next(rest) for _ in group] for group in references]


# -- ROUGE-L and CIDEr on PTB tokens ---------------------------------------------------------------
def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_tokenized(hypotheses: list[str], references: list[list[str]]) -> float:
    """ROUGE-L of PTB-tokenized texts (:func:`ptb_tokenize` output); see the module docstring."""
    _check(hypotheses, references)
    total = 0.0
    for hyp, group in zip(hypotheses, references):
        hyp_tokens = hyp.split(" ")
        precision = recall = 0.0
        for ref in group:
            ref_tokens = ref.split(" ")
            common = _lcs_length(ref_tokens, hyp_tokens)
            precision = max(precision, common / len(hyp_tokens))
            recall = max(recall, common / len(ref_tokens))
        if precision and recall:
            total += (1 + _ROUGE_BETA**2) * precision * recall / (recall + _ROUGE_BETA**2 * precision)
    return total / len(hypotheses)


def cider_tokenized(hypotheses: list[str], references: list[list[str]], max_n: int = MAX_CIDER_N) -> float:
    """CIDEr-D of PTB-tokenized texts (:func:`ptb_tokenize` output); see the module docstring."""
    _check(hypotheses, references)

    def counts(text: str) -> Counter:
        tokens = text.split()
        grams: Counter = Counter()
        for n in range(1, max_n + 1):
            grams.update(_ngrams(tokens, n))
        return grams

    hyps = [counts(hyp) for hyp in hypotheses]
    refs = [[counts(ref) for ref in group] for group in references]
    doc_freq = Counter(gram for group in refs for gram in set().union(*group))
    log_docs = math.log(len(refs))

    def tfidf(grams: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(max_n)]
        for gram, tf in grams.items():
            vectors[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]
        bigrams = sum(tf for gram, tf in grams.items() if len(gram) == 2)
        return vectors, norms, bigrams

    total = 0.0
    for hyp_grams, group in zip(hyps, refs):
        hyp_vecs, hyp_norms, hyp_len = tfidf(hyp_grams)
        similarity = 0.0
        for ref_grams in group:
            ref_vecs, ref_norms, ref_len = tfidf(ref_grams)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))
            for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms):
                dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in hyp_vec.items())
                if hyp_norm and ref_norm:
                    dot /= hyp_norm * ref_norm
                similarity += penalty * dot
        total += 10.0 * similarity / (max_n * len(group))
    return total / len(hypotheses)


def rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean ROUGE-L F (beta 1.2) of best precision and best recall over references, in 0..1."""
    _check(hypotheses, references)
    return rouge_l_tokenized(*_tokenize_all(hypotheses, references))


def cider(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean CIDEr-D over outputs, in 0..10 (see the module docstring)."""
    _check(hypotheses, references)
    return cider_tokenized(*_tokenize_all(hypotheses, references))


# -- METEOR (the official jar) ----------------------------------------------------------------------
def meteor_tokenized(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 of PTB-tokenized texts from the official jar; raises MetricUnavailable
    when it can't run. Starting the JVM and loading the paraphrase table takes about 10 s."""
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
                    # The official wrapper strips "|||" and double spaces from the hypothesis only.
                    stats = []
                    for hyp, group in zip(hypotheses, references):
                        hyp = hyp.replace("|||", "").replace("  ", " ")
                        stats.append(_meteor_ask(proc, " ||| ".join(["SCORE", *group, hyp])))
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


def meteor(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 in 0..1 on PTB tokens; raises MetricUnavailable when it can't run."""
    _check(hypotheses, references)
    if find_java() is None:
        raise MetricUnavailable("java is not on PATH (METEOR 1.5 is a Java program)")
    if find_meteor_jar() is None:
        raise MetricUnavailable("meteor-1.5.jar not found: install pycocoevalcap, which ships it")
    return meteor_tokenized(*_tokenize_all(hypotheses, references))


def _meteor_ask(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().strip()
    if not answer:
        raise ValueError("METEOR closed its output")
    return answer


_TOKENIZED_SCORERS = {"meteor": meteor_tokenized, "rouge_l": rouge_l_tokenized, "cider": cider_tokenized}


def e2e_metrics(hypotheses: list[str], references: list[list[str]]) -> tuple[dict[str, float | None], dict[str, str]]:
    """All five E2E scores, and ``metric -> reason`` for each that could not be computed here.

    A metric that could not be computed scores None (never 0). The texts are PTB-tokenized once for
    METEOR, ROUGE-L and CIDEr; without the tokenizer all three are None. Scales: module docstring.
    """
    _check(hypotheses, references)
    scores: dict[str, float | None] = {"bleu": bleu(hypotheses, references), "nist": nist(hypotheses, references)}
    missing: dict[str, str] = {}
    try:
        tokenized = _tokenize_all(hypotheses, references)
    except MetricUnavailable as exc:
        tokenized = None
        reason = f"no PTB tokens: {exc}"
    for name, scorer in _TOKENIZED_SCORERS.items():
        if tokenized is None:
            scores[name], missing[name] = None, reason
            continue
        try:
            scores[name] = scorer(*tokenized)
        except MetricUnavailable as exc:
            scores[name], missing[name] = None, str(exc)
    return scores, missing
