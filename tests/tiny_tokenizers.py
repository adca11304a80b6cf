"""Tiny source tokenizers of the two supported families, trained in well under a second.

Shared by the test suites of every module (wrapped as session fixtures in ``tests/conftest.py``):

- :func:`make_bytelevel_tokenizer` — byte-level BPE over the GPT-2 byte-to-unicode alphabet
  (the GPT-2 / Llama 3 / SmolLM2 / Qwen family);
- :func:`make_sentencepiece_tokenizer` — SentencePiece-style BPE with ``byte_fallback`` and the
  ``<0x00>``..``<0xFF>`` pieces in the vocabulary, laid out like Llama 2's ``tokenizer.json``;
- :func:`make_wordpiece_tokenizer` — a BERT-style WordPiece, which bytelift must refuse.

Everything is built from :data:`CORPUS`, a small built-in multilingual + code text.
"""

from __future__ import annotations

import json
from collections import Counter

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORPUS",
    "SAMPLE_TEXTS",
    "make_bytelevel_tokenizer",
    "make_sentencepiece_tokenizer",
    "make_wordpiece_tokenizer",
]

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A byte-level language model reads raw bytes instead of
subword tokens, so it can spell, count letters and handle any script without an unknown token.
Tokenization splits text into pieces; the model then predicts the next piece. In 1969, 42 people
walked 3.5 miles to the station, and nobody complained about the weather or the price of tea.
"She said: 'It's fine, isn't it?'" -- he replied (quietly) that everything was [mostly] OK!
"""

_FRENCH_GERMAN = """\
Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë au delà des îles.
Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich; Grüße aus München und Köln.
"""

_RUSSIAN_GREEK = """\
Съешь же ещё этих мягких французских булок, да выпей чаю. Широкая электрификация южных губерний.
Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.
"""

_CHINESE_JAPANESE = """\
我能吞下玻璃而不伤身体。语言模型可以直接读取字节，而不需要分词器。今天天气很好，我们去公园散步吧。
いろはにほへと ちりぬるを わかよたれそ つねならむ。私はガラスを食べられます。それは私を傷つけません。
"""

_ARABIC_HEBREW = """\
أنا قادر على أكل الزجاج و هذا لا يؤلمني. النموذج اللغوي يقرأ البايتات مباشرة.
אני יכול לאכול זכוכית וזה לא מזיק לי. שלום עולם!
"""

_EMOJI = """\
Emoji: 😀 😂 🚀 🎉 👍🏽 ❤️ 🇫🇷 👩‍💻 — tabs\tand\r\nline breaks, plus symbols: © ® ™ € £ ¥ § ¶ ° ± × ÷ µ.
"""

_CODE = '''\
def longest_suffix(data: bytes, vocab: dict[bytes, int]) -> list[int]:
    """Return, for every position, the id of the longest vocabulary entry ending there."""
    out = []
    for end in range(1, len(data) + 1):
        best = -1
        for start in range(max(0, end - 16), end):
            piece = data[start:end]
            if piece in vocab:
                best = vocab[piece]
                break
        out.append(best)
    return out


class Counter(dict):
    def __missing__(self, key):
        return 0

    def update(self, items):
        for item in items:
            self[item] += 1  # count every occurrence


if __name__ == "__main__":
    counts = Counter()
    counts.update("hello world".split())
    print({k: v for k, v in sorted(counts.items())}, file=sys.stderr)
    x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares of even numbers
'''

#: The training text of every tiny tokenizer (about 4 KB; repeated inside the builders).
CORPUS: str = _ENGLISH + _FRENCH_GERMAN + _RUSSIAN_GREEK + _CHINESE_JAPANESE + _ARABIC_HEBREW + _EMOJI + _CODE

#: Texts for tests, by name: each script of the corpus plus text the tokenizers never saw.
SAMPLE_TEXTS: dict[str, str] = {
    "english": _ENGLISH,
    "european": _FRENCH_GERMAN,
    "cyrillic_greek": _RUSSIAN_GREEK,
    "cjk": _CHINESE_JAPANESE,
    "rtl": _ARABIC_HEBREW,
    "emoji": _EMOJI,
    "code": _CODE,
    "unseen": "Ünïcödé ŧëxŧ ⊂ ∑∫ ⟨ψ|φ⟩ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 한국어 텍스트 ภาษาไทย हिन्दी 🦀🦀🦀",
}


# Characters of the SentencePiece-style tokenizer's alphabet (the rest become <0xNN> byte pieces).
SP_ALPHABET = 120


def _train_lines(repeat: int) -> list[str]:
    return CORPUS.splitlines(keepends=True) * repeat


def make_bytelevel_tokenizer(vocab_size: int = 800, full_alphabet: bool = True) -> PreTrainedTokenizerFast:
    """A tiny GPT-2-style byte-level BPE, wrapped as a ``PreTrainedTokenizerFast``.

    Args:
        vocab_size: target vocabulary size (specials + alphabet + merges).
        full_alphabet: include all 256 single bytes (as GPT-2 does). With ``False`` only the bytes seen in
            :data:`CORPUS` get a token — like SmolLM2, which lacks 21 single bytes.

    Specials: ``<|endoftext|>`` (id 0, eos), ``<|bos|>`` (id 1), ``<|pad|>`` (id 2).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(_train_lines(4), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def make_sentencepiece_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE with byte fallback, laid out like Llama 2's ``tokenizer.json``.

    Vocabulary: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>`` = 3..258 (ordinary vocabulary
    entries, as in Llama 2), then the learned pieces; ``▁`` stands for a space. Pre-tokenizer: Metaspace
    (``▁``, prepend_scheme ``first``, no split); decoder: Replace(``▁``→`` ``) + ByteFallback + Fuse +
    Strip(one leading space). The alphabet is limited to the most frequent characters, so rare characters
    (many CJK ones, emoji) are encoded as ``<0xNN>`` byte pieces.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]

    # 1. Learn pieces and merges on ▁-marked words (SentencePiece trains on whitespace-split words too).
    # The alphabet is chosen here, by (count, character): the trainer's own `limit_alphabet` cut breaks ties
    # between equally frequent characters in hash order, so each process got a different vocabulary.
    lines = _train_lines(4)
    counts = Counter(ch for line in lines for ch in "▁" + line.replace(" ", "▁"))
    alphabet = [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:SP_ALPHABET]]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size - len(byte_pieces),
            special_tokens=specials,
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet),
            show_progress=False,
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    learned_vocab: dict[str, int] = learned["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    # 2. Re-lay the vocabulary: specials, then the 256 byte pieces, then the learned pieces.
    vocab: dict[str, int] = {}
    for piece in specials + byte_pieces:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned_vocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([])  # Llama 2 has no Unicode normalisation either
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_wordpiece_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A tiny BERT-style WordPiece tokenizer: its pieces are not byte strings, so bytelift must refuse it."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        _train_lines(2),
        trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
