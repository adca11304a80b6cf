"""Predicted patch boundaries against the source tokenizer's tokens: the engine of ``bytelift show``.

``boundary_view(model, text)`` runs the byte model once and collects, as byte offsets into the text, where
its predicted patches end and where the source tokenizer's tokens end, with the predictor's per-byte
boundary probability. ``render_terminal`` and ``render_html`` draw the two segmentations one above the other
(byte-aligned: both rows show every byte with the same glyph), and ``show`` does all of it from a model
folder.

Conventions:

- A boundary is the offset of the *last* byte of a patch/token. The last byte of the text always ends both
  a patch and a token, so it carries no information: it is kept in ``predicted``/``source`` (the segments
  need it) but excluded from precision/recall, and its probability is NaN (the predictor looks one byte
  ahead, so it cannot decide there).
- Bytes are bytes: invalid UTF-8 is shown, segmented and scored like any other byte. The source tokenizer
  only takes text, so it tokenizes each valid UTF-8 run on its own and every invalid byte counts as a
  one-byte token (what byte-level BPE and byte fallback make of it).
- Text longer than the global model's context (``config.max_patches`` patches) raises ``ValueError``
  naming the limit and about how many bytes fit; nothing is silently truncated, since a partial view of
  a document would report misleading statistics for it.
"""

from __future__ import annotations

import bisect
import html
import math
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bytelift.tokenization import ids_to_bytes, text_to_bytes

__all__ = ["BoundaryView", "boundary_view", "render_terminal", "render_html", "show"]


# --------------------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------------------


@dataclass
class BoundaryView:
    """Two segmentations of the same bytes, as the offsets of the last byte of each segment.

    Attributes:
        text_bytes: the text, n ≥ 1 bytes.
        predicted: increasing offsets in [0, n) where a predicted patch ends; the last is n − 1.
        source: increasing offsets in [0, n) where a source-tokenizer token ends; the last is n − 1.
        boundary_probs: (n,) the predictor's probability that byte i ends a patch; NaN for byte n − 1.
    """

    text_bytes: bytes
    predicted: list[int]
    source: list[int]
    boundary_probs: list[float]

    def __post_init__(self):
        self.text_bytes = bytes(self.text_bytes)
        n = len(self.text_bytes)
        if n == 0:
            raise ValueError("BoundaryView: text_bytes is empty")
        for name in ("predicted", "source"):
            ends = [int(e) for e in getattr(self, name)]
            increasing = all(a < b for a, b in zip(ends, ends[1:]))
            if not ends or ends[0] < 0 or ends[-1] != n - 1 or not increasing:
                raise ValueError(
                    f"BoundaryView: {name} must be increasing byte offsets in [0, {n}) ending with the last byte "
                    f"({n - 1}); got {ends[:8]}{'...' if len(ends) > 8 else ''}"
                )
            setattr(self, name, ends)
        self.boundary_probs = [float(p) for p in self.boundary_probs]
        if len(self.boundary_probs) != n:
            raise ValueError(f"BoundaryView: {len(self.boundary_probs)} boundary_probs for {n} bytes")

    # ---- segments -------------------------------------------------------------------------------------

    def _segments(self, ends: Sequence[int]) -> list[bytes]:
        starts = [0, *(e + 1 for e in ends[:-1])]
        return [self.text_bytes[s : e + 1] for s, e in zip(starts, ends)]

    def predicted_patches(self) -> list[bytes]:
        """The predicted patches; they join to ``text_bytes``."""
        return self._segments(self.predicted)

    def source_tokens(self) -> list[bytes]:
        """The source tokenizer's tokens (as bytes of the text); they join to ``text_bytes``."""
        return self._segments(self.source)

    # ---- agreement ------------------------------------------------------------------------------------

    @property
    def true_positives(self) -> int:
        """Decidable offsets (all but the last byte) that end both a patch and a token."""
        return len(set(self.predicted[:-1]) & set(self.source[:-1]))

    @property
    def precision(self) -> float:
        """Share of predicted boundaries (last byte excluded) that are source boundaries.

        With no predicted boundary: 1.0 if the source has none either (full agreement), else 0.0.
        """
        return _ratio(self.true_positives, len(self.predicted) - 1, len(self.source) == 1)

    @property
    def recall(self) -> float:
        """Share of source boundaries (last byte excluded) that were predicted; the same 0/0 rule as precision."""
        return _ratio(self.true_positives, len(self.source) - 1, len(self.predicted) == 1)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    @property
    def bytes_per_patch(self) -> float:
        return len(self.text_bytes) / len(self.predicted)

    @property
    def bytes_per_token(self) -> float:
        return len(self.text_bytes) / len(self.source)


def _ratio(hits: int, total: int, other_empty: bool) -> float:
    if total == 0:
        return 1.0 if other_empty else 0.0
    return hits / total


# --------------------------------------------------------------------------------------------------------
# Computing a view
# --------------------------------------------------------------------------------------------------------


def boundary_view(model, text: str | bytes) -> BoundaryView:
    """Predicted patch ends and source token ends of ``text``.

    Runs ``model`` (a ``ByteliftForCausalLM`` with its ``ByteTokenizer`` attached) once, without gradients
    and in eval mode (its training mode is restored afterwards), on ``<bos>`` + the bytes of ``text``.

    Args:
        model: the byte model; its tokenizer must wrap the source tokenizer.
        text: ``str`` (UTF-8, surrogate-escaped raw bytes allowed) or ``bytes`` (anything, invalid UTF-8 included).

    Raises:
        ValueError: empty text; no (source) tokenizer attached; more predicted patches than the global
            model's context holds.
    """
    data = text_to_bytes(text)
    if not data:
        raise ValueError("the text is empty: there are no bytes to split into patches")
    tok = getattr(model, "tokenizer", None)
    if tok is None or tok.source_tokenizer is None:
        raise ValueError(
            "the model has no ByteTokenizer with a source tokenizer attached; load it with "
            "ByteliftForCausalLM.from_pretrained(folder) or call model.attach_tokenizer(ByteTokenizer.from_source(...))"
        )
    source = _source_ends(tok, data)  # before the model runs: its errors are the cheap ones

    n = len(data)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in tok(data, return_tensors="pt").items()}  # each (1, n + 1), bos first
    mask = batch["attention_mask"].bool()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _check_context(model, batch, mask)
            out = model(**batch)
            boundary = model.predict_boundaries(out.boundary_logprobs, mask, batch["input_ids"])[0].cpu()  # (n + 1,)
            logprobs = out.boundary_logprobs[0].float().cpu()  # (n + 1,)
    finally:
        model.train(was_training)

    # Input position t + 1 holds byte t; position 0 (bos) always ends its own patch and is no byte.
    inner = torch.nonzero(boundary[1:n]).flatten()
    predicted = [*inner.tolist(), n - 1]
    probs = [*logprobs[1:n].exp().tolist(), math.nan]
    return BoundaryView(text_bytes=data, predicted=predicted, source=source, boundary_probs=probs)


def _check_context(model, batch: dict, mask: torch.Tensor) -> None:
    """Raise before the global model would: a clear error with the limit and how many bytes fit.

    Args:
        batch: ``input_ids`` and ``expanded_ids``, each (1, L) with L = 1 + bytes (bos first).
        mask: (1, L) bool, all true.
    """
    limit = model.config.max_patches
    n_positions = batch["input_ids"].shape[1]
    if limit is None or n_positions <= limit:  # every position a patch would still fit
        return
    # Only the local encoder and the predictor: cheap next to the global model, and they have no context limit.
    h, _ = model.encoder(batch["input_ids"], batch["expanded_ids"], mask=mask)
    ends = model.predict_boundaries(model.boundary_predictor(h, mask), mask, batch["input_ids"])[0]
    count = int(ends.sum())
    if count <= limit:
        return
    # The (limit + 1)-th boundary at input position k: the first k bytes fit (boundaries look one byte ahead).
    fit = int(torch.nonzero(ends.long().cumsum(0) > limit)[0])
    raise ValueError(
        f"the text is {n_positions - 1} bytes, which the model splits into {count} patches (bos included), but its "
        f"global model's context is {limit} patches; shorten the text (about the first {fit} bytes fit)"
    )


# Each of these is one raw byte that did not decode (surrogateescape).
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")


def _source_ends(tok, data: bytes) -> list[int]:
    """Offsets of the last byte of each source token of ``data`` (the last is len(data) − 1)."""
    text = data.decode("utf-8", "surrogateescape")
    ends: list[int] = []
    pos = 0
    for piece in _ESCAPED_BYTE.split(text):
        if not piece:
            continue
        if _ESCAPED_BYTE.fullmatch(piece):
            lengths = [1]
        else:
            lengths = _token_lengths(tok, piece)
        for length in lengths:
            pos += length
            ends.append(pos - 1)
    assert pos == len(data), "source token lengths do not cover the text"
    return ends


def _token_lengths(tok, text: str) -> list[int]:
    """Byte lengths of the source tokens of ``text`` (valid UTF-8); they sum to len(text.encode())."""
    run = text.encode("utf-8")
    src = tok.source_tokenizer
    # Special-looking text ("<s>") is text here, as it is for the byte model.
    ids = src(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    try:
        byte_ids, lengths = tok.source_bytes_and_patches(ids)
    except ValueError:  # an id without bytes (an unknown token): align by character offsets instead
        byte_ids, lengths = None, None
    if byte_ids is not None:
        spelled = ids_to_bytes(byte_ids)
        extra = len(spelled) - len(run)
        # SentencePiece prepends a space ('▁') that is not in the text: it leaves the first token(s).
        no_specials = len(spelled) == int(lengths.sum())
        if no_specials and extra >= 0 and spelled.endswith(run) and not spelled[:extra].strip(b" "):
            return _drop_prefix(lengths.tolist(), extra)
    return _lengths_from_offsets(src, text, run)


def _drop_prefix(lengths: list[int], extra: int) -> list[int]:
    out = []
    for length in lengths:
        cut = min(extra, length)
        extra -= cut
        if length > cut:
            out.append(length - cut)
    return out


def _lengths_from_offsets(src, text: str, run: bytes) -> list[int]:
    """Token byte lengths from the tokenizer's character offsets (used when its tokens do not spell the text,
    e.g. under Unicode normalisation); boundaries inside a character are lost."""
    warnings.warn(
        "the source tokens do not spell the text byte for byte (the source tokenizer normalises it); its token "
        "boundaries are placed by character offsets instead",
        stacklevel=4,
    )
    try:
        offsets = src(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)[
            "offset_mapping"
        ]
    except NotImplementedError as err:
        raise ValueError(
            "the source tokenizer's tokens do not spell the text and it gives no character offsets (a slow "
            "tokenizer?); load the source with a fast tokenizer"
        ) from err
    byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    ends = sorted({int(byte_at[e]) for _, e in offsets if e > 0} | {len(run)})
    return np.diff([0, *ends]).tolist()


# --------------------------------------------------------------------------------------------------------
# Glyphs: what each byte looks like on screen
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """A run of bytes drawn as one glyph: a whole character, or one escaped byte."""

    start: int
    end: int  # exclusive
    text: str
    width: int  # terminal cells


_VISIBLE = {"\n": "↵", "\t": "⇥"}
_ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # invisible or not text


def _units(view: BoundaryView, escape: str = "") -> list[_Unit]:
    """The glyphs of the text. A character that a patch or token boundary splits is drawn byte by byte in
    both rows, so both rows show the same glyphs and stay aligned; so are invalid bytes, and the
    characters in ``escape`` (the separator of the colourless rows)."""
    data = view.text_bytes
    cuts = sorted({e + 1 for e in view.predicted} | {e + 1 for e in view.source})
    units: list[_Unit] = []
    pos = 0
    for ch in data.decode("utf-8", "surrogateescape"):
        raw = 0xDC80 <= ord(ch) <= 0xDCFF  # an undecodable byte
        size = 1 if raw else len(ch.encode("utf-8"))
        k = bisect.bisect_right(cuts, pos)
        split = k < len(cuts) and cuts[k] < pos + size
        hidden = ch not in _VISIBLE and unicodedata.category(ch) in _ESCAPED_CATEGORIES
        if raw or split or hidden or ch in escape:
            units.extend(_Unit(i, i + 1, f"\\x{data[i]:02x}", 4) for i in range(pos, pos + size))
        else:
            glyph = _VISIBLE.get(ch, ch)
            width = 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
            units.append(_Unit(pos, pos + size, glyph, width))
        pos += size
    return units


def _segment_index(ends: Sequence[int], offset: int) -> int:
    """Index of the segment holding byte ``offset``."""
    return bisect.bisect_left(ends, offset)


def _groups(chunk: list[_Unit], ends: Sequence[int]) -> list[list[_Unit]]:
    """Split a line's glyphs into runs that belong to one segment of the row whose segments end at ``ends``."""
    groups: list[list[_Unit]] = []
    for unit in chunk:
        if groups and _segment_index(ends, unit.start) == _segment_index(ends, groups[-1][0].start):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def _chunks(units: list[_Unit], rows: Sequence[Sequence[int]], width: int, separators: bool) -> list[list[_Unit]]:
    """Greedy line wrapping: as many glyphs per line as fit in ``width`` cells in every row (a ``|`` after each
    segment end counts one cell when ``separators``)."""
    ends = [set(r) for r in rows]
    chunks: list[list[_Unit]] = []
    line: list[_Unit] = []
    used = [0] * len(rows)
    for unit in units:
        cost = [unit.width + (separators and unit.end - 1 in e) for e in ends]
        if line and any(u + c > width for u, c in zip(used, cost)):
            chunks.append(line)
            line, used = [], [0] * len(rows)
        line.append(unit)
        used = [u + c for u, c in zip(used, cost)]
    if line:
        chunks.append(line)
    return chunks


def _summary(view: BoundaryView) -> str:
    return (
        f"{len(view.text_bytes)} bytes, {len(view.predicted)} patches, {len(view.source)} tokens; "
        f"{view.bytes_per_patch:.2f} bytes/patch, {view.bytes_per_token:.2f} bytes/token; "
        f"boundaries vs source: P {view.precision:.3f} R {view.recall:.3f} F1 {view.f1:.3f}"
    )


# --------------------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------------------

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
# 256-colour backgrounds (light, with a black foreground), alternating per segment.
_PATCH_COLOURS = ("\x1b[38;5;16;48;5;153m", "\x1b[38;5;16;48;5;183m")
_TOKEN_COLOURS = ("\x1b[38;5;16;48;5;157m", "\x1b[38;5;16;48;5;223m")
_LABELS = ("patches  ", "tokens   ")


def render_terminal(view: BoundaryView, color: bool = True, width: int = 100) -> str:
    """The two segmentations, one above the other, wrapped at ``width`` columns, then a legend and a summary.

    Each wrapped line of the text becomes two lines: the predicted patches and the source tokens. With
    ``color`` each segment gets alternating background colours (ANSI) and the two rows are byte-aligned;
    without, every segment is followed by ``|`` (a literal ``|`` in the text is then shown as ``\\x7c``).
    Newlines are shown as ``↵``, tabs as ``⇥``, other control characters, invalid bytes and the bytes of a
    character that a boundary splits as ``\\xNN``.
    """
    label_width = len(_LABELS[0])
    if width < label_width + 8:
        raise ValueError(f"width={width} is too narrow (at least {label_width + 8} columns)")
    rows = (view.predicted, view.source)
    units = _units(view, escape="" if color else "|")
    lines = []
    for chunk in _chunks(units, rows, width - label_width, separators=not color):
        for label, ends, colours in zip(_LABELS, rows, (_PATCH_COLOURS, _TOKEN_COLOURS)):
            parts = [f"{_DIM}{label}{_RESET}" if color else label]
            for group in _groups(chunk, ends):
                text = "".join(u.text for u in group)
                if color:  # reset after every segment, so a colour never bleeds past the line end
                    parts.append(f"{colours[_segment_index(ends, group[0].start) % 2]}{text}{_RESET}")
                else:
                    parts.append(text + ("|" if group[-1].end - 1 in ends else ""))
            lines.append("".join(parts))
        lines.append("")
    if color:
        swatch = "".join(f"{c}  {_RESET}" for c in _PATCH_COLOURS), "".join(f"{c}  {_RESET}" for c in _TOKEN_COLOURS)
        legend = f"{swatch[0]} predicted patches   {swatch[1]} source tokens   "
    else:
        legend = "each patch / token is followed by |   "
    legend += "↵ newline  ⇥ tab  \\xNN control, invalid or split byte" + ("" if color else " (| is \\x7c)")
    lines.append(legend)
    lines.append(_summary(view))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.chunk { margin-bottom: 0.9em; }
.row { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; line-height: 1.5; }
.label { display: inline-block; width: 5.5em; color: #888; font-size: 0.85em; }
.seg { padding: 1px 0; }
.patches .s0 { background: #cfe3ff; } .patches .s1 { background: #e7d9ff; }
.tokens .s0 { background: #d4f4d4; } .tokens .s1 { background: #ffe4c4; }
.end.agree { box-shadow: inset -2px 0 0 #2e9d2e; }
.end.disagree { box-shadow: inset -3px 0 0 #d62728; }
.legend span { padding: 0 0.4em; margin-right: 0.8em; }
table.summary { border-collapse: collapse; margin-top: 1em; }
table.summary td { padding: 2px 12px 2px 0; }
table.summary td.value { font-family: ui-monospace, Menlo, Consolas, monospace; text-align: right; }
"""


def render_html(view: BoundaryView, title: str = "bytelift show", width: int = 100) -> str:
    """A self-contained HTML page (inline CSS, no scripts or external assets) of the two segmentations.

    Rows ``<div class="row patches">`` and ``<div class="row tokens">``, wrapped every ``width`` columns;
    each segment is a ``<span class="seg">`` in alternating colours whose end is marked green where the
    other row has a boundary at the same byte and red where it does not; hovering shows the byte range and
    the predictor's boundary probability at the segment's last byte. A summary table follows.
    """
    rows = (
        ("patches", "patch", view.predicted, set(view.source)),
        ("tokens", "token", view.source, set(view.predicted)),
    )
    units = _units(view)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="legend"><span class="patches"><span class="s0">predicted patches</span></span>'
        '<span class="tokens"><span class="s0">source tokens</span></span>'
        '<span class="end agree">boundary in both rows</span>'
        '<span class="end disagree">boundary in this row only</span>'
        "↵ newline, ⇥ tab, \\xNN control, invalid or split byte</p>",
    ]
    last = len(view.text_bytes) - 1
    for chunk in _chunks(units, [r[2] for r in rows], width, separators=False):
        out.append('<div class="chunk">')
        for css, noun, ends, other in rows:
            spans = [f'<div class="row {css}"><span class="label">{css}</span>']
            for group in _groups(chunk, ends):
                index = _segment_index(ends, group[0].start)
                end = ends[index]
                start = ends[index - 1] + 1 if index else 0
                classes = f"seg s{index % 2}"
                if group[-1].end - 1 == end:
                    classes += " end agree" if end in other or end == last else " end disagree"
                prob = view.boundary_probs[end]
                p_text = "end of text" if math.isnan(prob) else f"p(boundary) = {prob:.3f}"
                tip = f"{noun} {index + 1}: bytes {start}\u2013{end}, {p_text}"
                text = "".join(u.text for u in group)
                spans.append(f'<span class="{classes}" title="{html.escape(tip)}">{html.escape(text)}</span>')
            spans.append("</div>")
            out.append("".join(spans))
        out.append("</div>")
    figures = [
        ("bytes", f"{len(view.text_bytes)}"),
        ("patches", f"{len(view.predicted)}"),
        ("tokens", f"{len(view.source)}"),
        ("bytes / patch", f"{view.bytes_per_patch:.2f}"),
        ("bytes / token", f"{view.bytes_per_token:.2f}"),
        ("boundary precision", f"{view.precision:.3f}"),
        ("boundary recall", f"{view.recall:.3f}"),
        ("boundary F1", f"{view.f1:.3f}"),
    ]
    out.append('<table class="summary">')
    out.extend(f'<tr><td>{name}</td><td class="value">{value}</td></tr>' for name, value in figures)
    out.append("</table>")
    out.append(
        "<p>Precision and recall compare the predicted patch ends with the source token ends over every byte but "
        "the last (which always ends both).</p>"
    )
    out.extend(["</body>", "</html>", ""])
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------------------


def show(
    model_or_path,
    text: str | bytes,
    html_path: str | os.PathLike | None = None,
    color: bool | None = None,
    width: int = 100,
) -> BoundaryView:
    """Print the boundary view of ``text`` and optionally write it as an HTML page.

    Args:
        model_or_path: a ``ByteliftForCausalLM`` (with its tokenizer attached) or a saved model folder.
        text: the text (``str`` or raw ``bytes``).
        html_path: where to write the HTML page (UTF-8), if given.
        color: ANSI colours; by default when stdout is a terminal.
        width: terminal and HTML line width in columns.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        from bytelift.modeling import ByteliftForCausalLM

        name = str(model_or_path)
        model = ByteliftForCausalLM.from_pretrained(name)
    else:
        model = model_or_path
        name = getattr(model, "name_or_path", "") or type(model).__name__
    view = boundary_view(model, text)
    if color is None:
        color = sys.stdout.isatty()
    print(render_terminal(view, color=color, width=width))
    if html_path is not None:
        page = render_html(view, title=f"bytelift show: {name}", width=width)
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(page)
    return view
