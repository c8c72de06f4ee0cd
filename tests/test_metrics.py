"""The evaluation metrics equal the libraries the authors' scripts call, with the settings they pass.

The authors score with Hugging Face `evaluate` (bleu with max_order=1, rouge, meteor, bertscore with
lang="en") one sample at a time; each test here calls the library under `evaluate`'s metric script
directly, as that script does, and requires our wrapper to agree.
"""

import math

import nltk
import pytest
from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer, scoring
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from med2e3_jax.evaluation import metrics as M

PAIRS = [
    ("The liver is enlarged. No focal lesion is seen.", "The liver is mildly enlarged, without focal lesions."),
    ("Hepatomegaly; spleen normal (12 cm).", "The liver is enlarged; the spleen measures 12 cm."),
    ("Axial plane.", "Coronal plane"),
    ("There is a 25-mm nodule in the right upper lobe, e.g. suspicious.", "A 2.5 cm nodule, right upper lobe."),
    ("the the the the", "the cat"),
    ("lungs", "Lungs are clear. Heart size is normal. There is no pleural effusion."),
    ("Dr. Smith noted mild ascites & a small effusion.", "Mild ascites. Small right pleural effusion."),
]


def _13a(text):
    return Tokenizer13a()(text).split()


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_bleu1_equals_nltk_sentence_bleu_on_13a_tokens(prediction, reference):
    expected = sentence_bleu([_13a(reference)], _13a(prediction), weights=(1,))
    assert M.bleu1(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_bleu1_is_clipped_unigram_precision_times_brevity_penalty():
    assert M.bleu1("the liver is enlarged .", "the liver appears enlarged.") == pytest.approx(4 / 5)
    assert M.bleu1("The liver", "the liver") == pytest.approx(1 / 2)  # case-sensitive, as evaluate's
    assert M.bleu1("the the the", "the cat") == pytest.approx(1 / 3)  # clipped, longer than the reference
    assert M.bleu1("liver", "the liver is enlarged") == pytest.approx(math.exp(1 - 4))  # brevity penalty
    assert M.bleu1("spleen", "the liver") == 0.0
    assert M.bleu1("   ", "the liver") == 0.0


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_equals_rouge_score_as_evaluate_aggregates_it(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    aggregator.add_scores(scorer.score(reference, prediction))
    expected = {name: score.mid.fmeasure for name, score in aggregator.aggregate().items()}
    ours = M.rouge(prediction, reference)
    assert ours == pytest.approx(expected, abs=1e-12)


def test_rouge_does_not_stem_as_evaluate_default():
    assert M.rouge("lesions", "lesion")["rouge1"] == 0.0
    assert M.rouge("The Lesion.", "the lesion")["rouge1"] == 1.0  # lower-cased, punctuation dropped


@pytest.fixture(scope="module")
def nltk_data():
    return M.prepare_nltk_data()


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_meteor_equals_nltk_single_meteor_score_on_word_tokenize(nltk_data, prediction, reference):
    expected = single_meteor_score(nltk.word_tokenize(reference), nltk.word_tokenize(prediction), alpha=0.9, beta=3,
                                   gamma=0.5)
    assert M.meteor(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_meteor_reproduces_the_value_evaluate_documents(nltk_data):
    prediction = "It is a guide to action which ensures that the military always obeys the commands of the party"
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert round(M.meteor(prediction, reference), 4) == 0.6944


def test_meteor_matches_wordnet_synonyms(nltk_data):
    # "tumour" is a lemma of WordNet 3.0's tumor.n.01; neither the surface forms nor the Porter stems match.
    # (nltk looks synonyms up for the stems, so "big" / "large" -> "larg" would not match.)
    exact = M.meteor("there is a tumor", "there is a tumor")
    assert M.meteor("there is a tumour", "there is a tumor") == exact
    assert M.meteor("there is a cyst", "there is a tumor") < exact


def test_word_tokenize_uses_punkt_english_sentences(nltk_data):
    tokens = M.word_tokenize("The liver is enlarged. Dr. Smith saw a 2.5 cm lesion in the U.S. today.")
    assert tokens == ["The", "liver", "is", "enlarged", ".", "Dr.", "Smith", "saw", "a", "2.5", "cm", "lesion",
                      "in", "the", "U.S.", "today", "."]


def test_prepare_nltk_data_installs_wordnet_30_and_punkt_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = M.prepare_nltk_data(tmp_path / "nltk_data")
    assert (root / "corpora" / "wordnet" / "data.noun").stat().st_size == 15300280  # Princeton's WordNet 3.0
    assert (root / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").is_file()
    assert str(root) == nltk.data.path[0]
    assert M.prepare_nltk_data(tmp_path / "nltk_data") == root  # a second call finds everything in place
    assert not [p for p in root.rglob(".*partial*")]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("bert_score")
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ("the liver is enlarged mildly without focal lesion lesions seen no spleen normal measures cm "
             "nodule right upper lobe a lungs are clear heart size there pleural effusion mild small").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ";", "(", ")", *words, "##s", "##ed", "12"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_bertscore_equals_bert_score_called_per_sample(tiny_bert):
    import bert_score

    predictions = [p for p, _ in PAIRS]
    references = [r for _, r in PAIRS]
    ours = M.BertScore(tiny_bert, num_layers=1, batch_size=3).f1(predictions, references)
    scorer = bert_score.BERTScorer(model_type=str(tiny_bert), num_layers=1, lang="en", idf=False,
                                   rescale_with_baseline=False, use_fast_tokenizer=False)
    for prediction, reference, f1 in zip(predictions, references, ours):
        _, _, expected = scorer.score([prediction], [[reference]])
        assert f1 == pytest.approx(float(expected[0]), abs=1e-6)


def test_bertscore_needs_a_model_folder(tmp_path):
    with pytest.raises(M.MetricUnavailable, match="config.json"):
        M.BertScore(tmp_path / "missing", num_layers=17)
    with pytest.raises(M.MetricUnavailable, match="bert_f1"):
        M.text_scores(["a"], ["a"], ["bert_f1"])


def test_empty_prediction_scores_zero_on_every_text_metric(tiny_bert, nltk_data):
    rows = M.text_scores(["  ", "the liver is enlarged"], ["the liver is enlarged", "the liver is enlarged"],
                         M.TEXT_METRICS, bertscore=M.BertScore(tiny_bert, num_layers=2))
    assert rows[0] == dict.fromkeys(M.TEXT_METRICS, 0.0)
    assert rows[1]["bleu1"] == rows[1]["rouge1"] == rows[1]["rougeL"] == pytest.approx(1.0)
    assert rows[1]["meteor"] > 0.9 and rows[1]["bert_f1"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "prediction, choice, correct",
    [
        ("B. Coronal plane", "B", True),
        ("The answer is B. Coronal.", "B", True),  # "B." inside a longer sentence
        ("  B.", "B", True),
        ("b. coronal plane", "B", False),  # lower case
        ("B", "B", False),  # no period
        ("B Coronal plane", "B", False),
        ("C. Sagittal plane", "B", False),
        ("A. Axial B. Coronal", "A", True),  # several letters: each one counts
        ("A. Axial B. Coronal", "B", True),
        ("Seen on CT.", "T", True),  # any "T." counts: the authors' plain substring test
    ],
)
def test_closed_vqa_correct_is_the_authors_substring_rule(prediction, choice, correct):
    assert M.closed_vqa_correct(prediction, choice) is correct


@pytest.mark.parametrize(
    "prediction, answer, correct",
    [
        ("(b) Mild emphysema.", "(b) Mild emphysema", True),
        ("The answer is (b).", "(b) Mild emphysema", True),
        ("(B) Mild emphysema", "(b) Mild emphysema", False),  # case-sensitive
        ("b) Mild emphysema", "(b) Mild emphysema", False),
        ("(a) or (b)", "(b) Mild emphysema", True),
        ("(a) Normal", "(a) Normal lungs (no nodules)", True),  # the first group of the answer
        ("(no nodules)", "(a) Normal lungs (no nodules)", False),
        ("(a) Normal", "Normal lungs", None),  # no label in the answer: left out
    ],
)
def test_ctrate_choice_correct_is_the_authors_parenthesis_rule(prediction, answer, correct):
    assert M.ctrate_choice_correct(prediction, answer) is correct


def test_aggregate_gives_per_type_means_their_mean_and_the_overall_mean():
    rows = [
        {"question_type": 1, "accuracy": True, "bleu1": 0.5},
        {"question_type": 1, "accuracy": False, "bleu1": 0.0},
        {"question_type": 2, "accuracy": True, "bleu1": 1.0},
        {"question_type": 2, "accuracy": None, "bleu1": 0.25},
    ]
    summary = M.aggregate(rows, ["accuracy", "bleu1"])
    assert summary["per_type"] == {
        "1": {"count": 2, "accuracy": 0.5, "bleu1": 0.25},
        "2": {"count": 2, "accuracy": 1.0, "bleu1": 0.625},
    }
    assert summary["mean_of_types"] == {"accuracy": 0.75, "bleu1": 0.4375}
    assert summary["overall"] == {"count": 4, "accuracy": 2 / 3, "bleu1": 0.4375}
    assert "per_type" not in M.aggregate([{"bleu1": 1.0}], ["bleu1"])
