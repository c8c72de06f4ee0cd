"""Tiny local tokenizers that behave like the real ones where the templates care, built without a hub.

For the tests and the pipeline benchmark, which tokenize conversations without downloading a real
tokenizer. Each is a word-level `tokenizers.Tokenizer` over a fixed vocabulary, wrapped in
`transformers.PreTrainedTokenizerFast`, so that tests can write the expected ids by hand
(`tok.convert_tokens_to_ids(["▁USER", ":", ...])`) instead of asking the code under test.
What is kept from the real tokenizers is what the chat templates depend on:

- `phi_like`: sentencepiece-style pieces (`▁word`, a `▁` prepended at the start of every separately
  tokenized chunk but not after a special token), BOS `<s>` added in front (as the golden fixture's
  prompts have it; `add_bos=False` for a tokenizer that does not), `<|endoftext|>` both EOS and PAD.
- `llama_like`: the same pieces, BOS `<s>`, EOS `</s>`, PAD `<unk>` (id 0), as Llama-2's tokenizer
  once the authors set `pad_token = unk_token`.
- `qwen_like`: byte-level pieces (`Ġword`, `Ċ` for a newline), no BOS, EOS `<|im_end|>`,
  PAD `<|endoftext|>`.
- `bert_like`: uncased WordPiece, `[CLS] ... [SEP]`, `[PAD]` = 0.

Words outside the vocabulary become the unknown piece; callers keep to `WORDS` (or pass `extra_words`).
"""

from __future__ import annotations

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

WORDS = (
    # The authors' system prompt.
    *("A", "chat", "between", "a", "curious", "user", "and", "an", "artificial", "intelligence", "assistant"),
    *("The", "gives", "helpful", "detailed", "polite", "answers", "to", "the", "s", "questions"),
    # Role names and test conversations.
    *("USER", "ASSISTANT", "Which", "organ", "shows", "lesion", "Where", "is", "it", "In", "left", "lobe"),
    *("of", "liver", "Yes", "no", "No", "kidney", "Describe", "this", "scan", "Findings", "Impression"),
    *("Choices", "B", "C", "D", "E", "normal", "enlarged", "What", "image", "plane", "axial", "coronal"),
    *("sagittal", "How", "many", "lesions", "are", "there", "two", "three", "Is"),
)
PUNCTUATION = (":", ".", ",", "?", "'", "(", ")")


def _punctuation_split():
    return pre_tokenizers.Split(Regex(r"[:.,?'()]"), "isolated")


def _wrap(tokenizer: Tokenizer, **special) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=100_000, **special)
    wrapped.padding_side = "right"
    return wrapped


def _sentencepiece_like(specials, *, bos: str | None, extra_words=()) -> Tokenizer:
    words = tuple(dict.fromkeys(WORDS + tuple(extra_words)))
    pieces = list(specials) + list(PUNCTUATION) + ["▁", "\n", "▁\n"]
    pieces += [p for w in words for p in (f"▁{w}", w)]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(pieces)}, unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            _punctuation_split(),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, pieces.index(bos))]
        )
    return tokenizer


def phi_like(*, add_bos: bool = True, extra_words=()) -> PreTrainedTokenizerFast:
    specials = ("<unk>", "<s>", "</s>", "<|endoftext|>")
    tokenizer = _sentencepiece_like(specials, bos="<s>" if add_bos else None, extra_words=extra_words)
    return _wrap(tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def llama_like(*, extra_words=()) -> PreTrainedTokenizerFast:
    specials = ("<unk>", "<s>", "</s>")
    tokenizer = _sentencepiece_like(specials, bos="<s>", extra_words=extra_words)
    return _wrap(tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def qwen_like(*, extra_words=()) -> PreTrainedTokenizerFast:
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    words = tuple(dict.fromkeys(WORDS + tuple(extra_words)))
    pieces = list(specials) + ["<unk>"] + list(PUNCTUATION) + ["'s", "Ġ", "Ċ", "ĊĊ"]
    pieces += [p for w in words for p in (f"Ġ{w}", w)]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return _wrap(tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def bert_like(*, extra_words=()) -> PreTrainedTokenizerFast:
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    words = tuple(dict.fromkeys(w.lower() for w in WORDS + tuple(extra_words)))
    pieces = list(specials) + list(PUNCTUATION) + list(words) + ["##s", "##es"]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return _wrap(
        tokenizer, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]"
    )
