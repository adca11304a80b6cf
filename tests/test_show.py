"""`bytelift show`'s engine: boundary views, their agreement figures, terminal and HTML rendering."""

from __future__ import annotations

import copy
import math
import re
from html.parser import HTMLParser

import pytest
import torch
from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast

from bytelift.evaluation.show import BoundaryView, boundary_view, render_html, render_terminal, show
from bytelift.modeling import ByteliftForCausalLM
from bytelift.tokenization import ByteTokenizer
from tests.tiny_models import tiny_source

ANSI = re.compile(r"\x1b\[[0-9;]*m")

TEXTS = [
    "Hello world, <|bos|> <s> héllo 中文 🙂\n\tend",
    b"bad \xff\xfe byte \xc3( and a cut \xe2\x82",
    "a",
    b"\xff",
    "  two leading spaces",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tokenizer, context=256):
    source = tiny_source("llama", tokenizer, context=context)
    return ByteliftForCausalLM.from_source(source, tokenizer, local_heads=4, decoder_layers=1).eval()


@pytest.fixture(scope="module")
def models(bytelevel_tokenizer, sentencepiece_tokenizer):
    return {"bytelevel": _model(bytelevel_tokenizer), "sentencepiece": _model(sentencepiece_tokenizer)}


@pytest.fixture
def model(models):
    return models["bytelevel"]


# ---- the view's figures ---------------------------------------------------------------------------------


def test_agreement_figures_by_hand():
    probs = [0.5] * 7 + [math.nan]
    view = BoundaryView(b"abcdefgh", predicted=[1, 3, 4, 7], source=[1, 2, 4, 6, 7], boundary_probs=probs)
    # Decidable: predicted {1, 3, 4}, source {1, 2, 4, 6}; both {1, 4}. The shared last byte 7 is not scored.
    assert view.true_positives == 2
    assert view.precision == pytest.approx(2 / 3)
    assert view.recall == pytest.approx(2 / 4)
    assert view.f1 == pytest.approx(4 / 7)
    assert view.bytes_per_patch == 2.0 and view.bytes_per_token == 1.6
    assert view.predicted_patches() == [b"ab", b"cd", b"e", b"fgh"]
    assert view.source_tokens() == [b"ab", b"c", b"de", b"fg", b"h"]

    whole = BoundaryView(b"abc", predicted=[2], source=[2], boundary_probs=[0.1, 0.1, math.nan])
    assert (whole.precision, whole.recall, whole.f1) == (1.0, 1.0, 1.0)  # nothing to split: full agreement
    none = BoundaryView(b"abc", predicted=[2], source=[0, 2], boundary_probs=[0.1, 0.1, math.nan])
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    every = BoundaryView(b"abc", predicted=[0, 1, 2], source=[0, 2], boundary_probs=[0.9, 0.9, math.nan])
    assert (every.precision, every.recall) == (0.5, 1.0) and every.f1 == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(text_bytes=b"", predicted=[], source=[], boundary_probs=[]),
        dict(text_bytes=b"abc", predicted=[1], source=[2], boundary_probs=[0, 0, 0]),  # misses the last byte
        dict(text_bytes=b"abc", predicted=[1, 1, 2], source=[2], boundary_probs=[0, 0, 0]),  # not increasing
        dict(text_bytes=b"abc", predicted=[2], source=[2], boundary_probs=[0, 0]),  # one prob per byte
    ],
)
def test_view_rejects_inconsistent_fields(kwargs):
    with pytest.raises(ValueError):
        BoundaryView(**kwargs)


# ---- boundary_view ----------------------------------------------------------------------------------------


def test_predicted_boundaries_map_to_byte_offsets(model, monkeypatch):
    text = b"abcdefgh"
    n = len(text)
    batch = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logprobs = model(**batch).boundary_logprobs[0]

    def forced(boundary_logprobs, mask, input_ids=None):  # input positions: 0 = bos, t + 1 = byte t
        out = torch.zeros_like(mask)
        out[:, [0, 3, 5]] = True
        return out & mask

    monkeypatch.setattr(model, "predict_boundaries", forced)
    model.train()
    view = boundary_view(model, text)
    assert model.training  # eval only for the call
    model.eval()
    assert view.predicted == [2, 4, n - 1]
    assert view.predicted_patches() == [b"abc", b"de", b"fgh"]
    assert len(view.boundary_probs) == n and math.isnan(view.boundary_probs[-1])
    assert view.boundary_probs[:-1] == pytest.approx(logprobs[1:n].exp().tolist(), abs=1e-6)


def test_threshold_extremes(model, monkeypatch):
    text = "patches everywhere"
    n = len(text)
    monkeypatch.setattr(model.config, "boundary_threshold", 1.0)  # p > 1 never holds
    assert boundary_view(model, text).predicted == [n - 1]
    monkeypatch.setattr(model.config, "boundary_threshold", 1e-9)  # p >= cos_eps / 2 always holds
    view = boundary_view(model, text)
    assert view.predicted == list(range(n))
    assert view.precision == pytest.approx((len(view.source) - 1) / (n - 1))  # every source end is a patch end
    assert view.recall == 1.0


@pytest.mark.parametrize("family", ["bytelevel", "sentencepiece"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_segments_rejoin_to_the_text(models, family, text):
    view = boundary_view(models[family], text)
    data = text.encode() if isinstance(text, str) else text
    assert view.text_bytes == data
    assert b"".join(view.predicted_patches()) == data
    assert b"".join(view.source_tokens()) == data
    assert all(view.predicted_patches()) and all(view.source_tokens())
    assert len(view.boundary_probs) == len(data)
    assert all(0.0 <= p <= 1.0 for p in view.boundary_probs[:-1])


@pytest.mark.parametrize("family", ["bytelevel", "sentencepiece"])
def test_source_boundaries_are_the_source_tokens(models, family, bytelevel_tokenizer, sentencepiece_tokenizer):
    src = {"bytelevel": bytelevel_tokenizer, "sentencepiece": sentencepiece_tokenizer}[family]
    token_bytes = models[family].tokenizer.source_vocab.token_bytes

    def tokens(text):
        pieces = [token_bytes[i] for i in src(text, add_special_tokens=False)["input_ids"]]
        if family == "sentencepiece" and not text.startswith(" "):  # the '▁' the source prepends is no text byte
            assert pieces[0].startswith(b" ")
            pieces[0] = pieces[0][1:]
        return [p for p in pieces if p]

    text = "The quick brown fox, naïve café 中文"
    assert boundary_view(models[family], text).source_tokens() == tokens(text)
    # Invalid bytes are one-byte tokens; the valid runs around them are tokenized on their own.
    view = boundary_view(models[family], b"Hello there\xffworld")
    assert view.source_tokens() == [*tokens("Hello there"), b"\xff", *tokens("world")]


def test_normalising_source_is_aligned_by_offsets(model, bytelevel_tokenizer, monkeypatch):
    backend = copy.deepcopy(bytelevel_tokenizer.backend_tokenizer)
    backend.normalizer = normalizers.NFKC()  # 'ﬁ' (3 bytes) becomes 'fi': the tokens no longer spell the text
    src = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                  pad_token="<|pad|>")
    monkeypatch.setattr(model, "tokenizer", ByteTokenizer.from_source(src))
    text = "ﬁne ﬁsh"
    with pytest.warns(UserWarning, match="character offsets"):
        view = boundary_view(model, text)
    assert b"".join(view.source_tokens()) == text.encode()
    char_ends = {len(text[: i + 1].encode()) - 1 for i in range(len(text))}
    assert set(view.source) <= char_ends and len(view.source) >= 2


def test_empty_text_raises(model):
    for empty in ("", b""):
        with pytest.raises(ValueError, match="empty"):
            boundary_view(model, empty)


def test_text_longer_than_the_context_raises(bytelevel_tokenizer):
    short = _model(bytelevel_tokenizer, context=16)
    short.config.boundary_threshold = 1e-9  # every byte its own patch
    # bos + 15 decided bytes = 16 patches; the last byte is no patch yet (it cannot be decided).
    assert len(boundary_view(short, "x" * 16).predicted) == 16
    with pytest.raises(ValueError, match=r"context is 16 patches.*about the first 16 bytes fit"):
        boundary_view(short, "x" * 17)
    with pytest.raises(ValueError, match=r"40 bytes.*40 patches.*context is 16 patches"):
        boundary_view(short, "x" * 40)


# ---- rendering --------------------------------------------------------------------------------------------

# "the cat\n" + an invalid byte + "é" whose two bytes a patch splits, and a literal '|'.
HAND = BoundaryView(
    b"the cat\n\xffa|b caf\xc3\xa9",
    predicted=[2, 6, 8, 11, 16, 17],
    source=[2, 3, 6, 7, 8, 9, 10, 11, 12, 15, 17],
    boundary_probs=[0.1, 0.2, 0.9, 0.4, 0.1, 0.1, 0.8, 0.3, 0.7, 0.1, 0.2, 0.6, 0.1, 0.1, 0.1, 0.2, 0.55, math.nan],
)


def test_terminal_without_colour():
    out = render_terminal(HAND, color=False)
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == r"patches  the| cat|↵\xff|a\x7cb| caf\xc3|\xa9|"
    assert lines[1] == r"tokens   the| |cat|↵|\xff|a|\x7c|b| |caf|\xc3\xa9|"
    assert "18 bytes, 6 patches, 11 tokens" in out
    assert f"P {HAND.precision:.3f} R {HAND.recall:.3f} F1 {HAND.f1:.3f}" in out


def test_terminal_with_colour_is_aligned():
    out = render_terminal(HAND, color=True)
    assert "\x1b[" in out
    patches, tokens = (ANSI.sub("", line) for line in out.splitlines()[:2])
    assert patches == r"patches  the cat↵\xffa|b caf\xc3\xa9"
    assert tokens == r"tokens   the cat↵\xffa|b caf\xc3\xa9"
    # Alternating colours: 6 patches -> 6 coloured runs in the first row.
    assert len(re.findall(r"\x1b\[38;5;16;48;5;(?:153|183)m", out.splitlines()[0])) == 6


def test_terminal_wraps_at_width():
    text = ("a few words, " * 30).encode()
    ends = [i for i in range(len(text)) if text[i : i + 1] == b" " or i == len(text) - 1]
    view = BoundaryView(text, predicted=ends, source=list(range(len(text))), boundary_probs=[0.5] * len(text))
    out = render_terminal(view, color=False, width=40)
    rows = [line for line in out.splitlines() if line.startswith(("patches", "tokens"))]
    assert len(rows) > 2 and all(len(line) <= 40 for line in rows)
    joined = "".join(line[9:] for line in rows if line.startswith("patches"))
    assert joined.split("|")[:-1] == [p.decode() for p in view.predicted_patches()]
    colored = render_terminal(view, color=True, width=40)
    assert all(len(ANSI.sub("", line)) <= 40 for line in colored.splitlines()[:-2])


class _Rows(HTMLParser):
    """Checks that tags nest, and collects the text of each row by its class."""

    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.titles, self.ends = [], {}, [], []
        self.current = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.VOID:
            return
        self.stack.append(tag)
        cls = attrs.get("class") or ""
        if tag == "div" and cls.startswith("row "):
            self.current = cls
            self.rows.setdefault(cls, "")
        if tag == "span" and "seg" in cls.split():
            self.titles.append(attrs.get("title"))
            self.ends.append(cls)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"mismatched </{tag}>"
        if tag == "div" and self.current and "div" not in self.stack[2:]:
            self.current = None

    def handle_data(self, data):
        if self.current and self.stack[-1] == "span" and data not in ("patches", "tokens"):
            self.rows[self.current] += data


def test_html_is_escaped_and_well_formed():
    text = b"<script>alert('x')</script> & co"
    n = len(text)
    probs = [0.9] * (n - 1) + [math.nan]
    view = BoundaryView(text, predicted=[7, 27, n - 1], source=[7, 20, n - 1], boundary_probs=probs)
    page = render_html(view, title="<b>model</b>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;model&lt;/b&gt;" in page
    assert "http" not in page and "<link" not in page  # self-contained
    parser = _Rows()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert parser.rows == {"row patches": text.decode(), "row tokens": text.decode()}
    assert "patch 1: bytes 0\u20137, p(boundary) = 0.900" in parser.titles
    assert any(t and t.endswith("end of text") for t in parser.titles)
    # Patch ends 7 (also a token end) agree, 27 does not; token end 20 is no patch end.
    assert parser.ends[:3] == ["seg s0 end agree", "seg s1 end disagree", "seg s0 end agree"]
    assert parser.ends[3:] == ["seg s0 end agree", "seg s1 end disagree", "seg s0 end agree"]
    # Decidable ends: predicted {7, 27}, source {7, 20} -> P = R = F1 = 1/2.
    assert '<td>boundary precision</td><td class="value">0.500</td>' in page
    assert '<td>boundary F1</td><td class="value">0.500</td>' in page


def test_show_from_a_saved_folder(model, tmp_path, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    html_path = tmp_path / "view.html"
    text = "Hello <world> & bytes \xff"
    view = show(str(folder), text, html_path=html_path)  # stdout is captured: no colours by default
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.startswith("patches  ") and "bytes/patch" in out
    assert view.predicted == boundary_view(model, text).predicted  # the reloaded model predicts the same
    page = html_path.read_text(encoding="utf-8")
    assert 'class="row patches"' in page and 'class="row tokens"' in page and "<world>" not in page
    assert str(folder) in page
