"""Checking what users give before time is spent, and saying what is wrong in one line.

Every `bytelift` command runs through ``run_command`` (``cli.main``): a ``UsageError`` or a path the
system refuses (missing, a folder for a file, no permission) becomes one line on stderr, ``bytelift
COMMAND: message``, and exit code 2, with no traceback; Ctrl-C becomes one line and exit code 130. Argument
errors go the same way through ``CommandParser``, the parser class every ``sub.add_parser`` inherits.

A new command adopts all of it by:
- raising ``UsageError`` for input it refuses, or calling the checks below (``model_folder``,
  ``readable_file``, ``writable_file``, ``output_folder``, ``fit_prompts``), which do;
- typing its numeric options with the argparse types below (``type=nonnegative_int``, ``probability``, ...);
- running library calls whose ``ValueError`` means bad input (a config's validation) inside
  ``with usage_errors():``.
Set ``BYTELIFT_TRACEBACK=1`` to see the traceback behind a one-line error.

This module imports nothing heavy at import time (the command line parses before torch loads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # argparse's own exit code for a bad command line
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class UsageError(ValueError):
    """Input the user can fix (a path, an option, a file's content): one line, exit code 2, no traceback."""


class ContextError(UsageError):
    """A text with more patches than the global model's context holds."""


# ========================================================================================================
# The command line: one-line argument errors, one-line usage errors
# ========================================================================================================


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``bytelift generate: argument --max-new-bytes: ...; see
    bytelift generate --help``) and exit code 2. Subparsers made by ``add_subparsers().add_parser`` are of
    this class too."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# The system's refusals of a path: the user's to fix, reported like a UsageError.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def run_command(func: Callable[[Any], int], args: Any, prog: str) -> int:
    """Run a command's function; its usage errors become one line on stderr and exit code 2."""
    try:
        return func(args)
    except (UsageError, *PATH_ERRORS) as err:
        if os.environ.get("BYTELIFT_TRACEBACK"):
            raise
        print(f"{prog}: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise ValueError and TypeError (and ``kinds``) from the block as UsageError: for library calls
    whose errors of these kinds can only mean bad input (a config's validation, a file's content)."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, *kinds) as err:
        raise UsageError(_one_line(err)) from err


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None and low != float("-inf"):
        parts.append(f"{'>' if low_open else '≥'} {low:g}")
    if high is not None and high != float("inf"):
        parts.append(f"{'<' if high_open else '≤'} {high:g}")
    return " and ".join(parts)


def _within(x: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if x != x:  # NaN
        return False
    if low is not None and (x <= low if low_open else x < low):
        return False
    return high is None or (x < high if high_open else x <= high)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """UsageError unless ``value`` is a number within the bounds (None allowed with ``optional``): for config
    fields, e.g. ``check_number("batch_size", cfg.batch_size, 1)``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _within(value, low, high, low_open, high_open):
        raise UsageError(f"{name} must be a number {_bounds_text(low, high, low_open, high_open)}, got {value!r}")


def _number_type(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool, text: str):
    """An argparse type: ``kind`` within the bounds, else a one-line ArgumentTypeError saying which."""
    expected = f"{'an integer' if kind is int else 'a number'} {_bounds_text(low, high, low_open, high_open)}".strip()

    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not _within(x, low, high, low_open, high_open):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return x

    parse.__name__ = text
    return parse


nonnegative_int = _number_type(int, 0, None, False, False, "nonnegative_int")
positive_int = _number_type(int, 1, None, False, False, "positive_int")
positive_float = _number_type(float, 0, float("inf"), True, True, "positive_float")
nonnegative_float = _number_type(float, 0, float("inf"), False, True, "nonnegative_float")
finite_float = _number_type(float, float("-inf"), float("inf"), True, True, "finite_float")
fraction = _number_type(float, 0, 1, True, True, "fraction")  # strictly between 0 and 1
probability = _number_type(float, 0, 1, True, False, "probability")  # (0, 1]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type for integers ≥ ``low``."""
    return _number_type(int, low, None, False, False, f"int_at_least_{low}")


def float_at_least(low: float) -> Callable[[str], float]:
    """An argparse type for finite numbers ≥ ``low``."""
    return _number_type(float, low, float("inf"), False, True, f"float_at_least_{low:g}")


# ========================================================================================================
# Paths
# ========================================================================================================


def model_folder(path: str | os.PathLike) -> str:
    """``path`` if it is a saved bytelift model folder (config and intact safetensors), else UsageError."""
    from bytelift.modeling import check_model_folder

    with usage_errors(FileNotFoundError):
        check_model_folder(path)
    return str(path)


def readable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a file this process can read (UsageError naming ``what`` otherwise)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no {what} {p}")
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"cannot read {what} {p}: permission denied")
    return p


def _creatable(path: Path, what: str) -> None:
    """UsageError unless ``path`` could be created: its nearest existing ancestor is a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create {what} {path}: {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create {what} {path}: {parent} is not writable")


def writable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if a file can be written there (its folder exists and is writable, it is no folder)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder, not a file")
    if not p.parent.absolute().is_dir():
        raise UsageError(f"cannot write {what} {p}: the folder {p.parent} does not exist")
    if not os.access(p if p.exists() else p.parent.absolute(), os.W_OK):
        raise UsageError(f"cannot write {what} {p}: permission denied")
    return p


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` if it is a folder or could be created as one (nothing is created here)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p} is a file, not a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{what} {p} is not writable")
    else:
        _creatable(p, what)
    return p


def folder_is_empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


# ========================================================================================================
# Prompts and the global model's context
# ========================================================================================================


def predicted_patch_ends(model, data: bytes):
    """(1 + len(data),) bool tensor: where the byte model ends its patches in bos + ``data`` (the encoder and
    the boundary predictor only: they have no context limit and cost little next to the global model)."""
    import torch

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in model.tokenizer(data, return_tensors="pt").items()}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        h, _ = model.encoder(batch["input_ids"], batch["expanded_ids"], mask=mask)
        return model.predict_boundaries(model.boundary_predictor(h, mask), mask, batch["input_ids"])[0].cpu()


# Passes of encoder + predictor that a --truncate'd prompt may take to fit (each drops the patches found in
# excess; the next checks that the shorter prompt's own patches fit).
TRUNCATE_PASSES = 4


def fit_prompts(model, prompts: Sequence[str], max_new_bytes: int, truncate: bool = False) -> list[str]:
    """Check each prompt against the global model's context before the encoder reads it.

    The byte model cuts a prompt into about as many patches as its source tokenizer makes tokens (the
    boundary predictor learns the source's token ends), so the source tokenizer's count, plus the bos
    patch, is compared with the context (``model.config.max_patches``); a prompt of fewer bytes than the
    context always fits (a patch holds at least one byte) and is not tokenized. A prompt within this
    estimate that the model still cuts into too many patches is refused by decoding (``ContextError``).

    With ``truncate``, a prompt that does not fit keeps its end: its last tokens, as many as leave room for
    ``max_new_bytes`` new patches (one per byte at worst, at most half the context), then cut further at
    the model's own patch ends until they fit (encoder and predictor over a context's worth of text). Without,
    UsageError.
    """
    import numpy as np

    limit = model.config.max_patches
    tok = model.tokenizer
    if limit is None or tok is None or tok.source_tokenizer is None:
        return list(prompts)
    room = min(max_new_bytes, limit // 2)
    budget = limit - room  # patches of a prompt, bos included, that leave room for the new ones
    out = []
    for i, prompt in enumerate(prompts):
        data = prompt.encode("utf-8", "surrogateescape")
        if len(data) + 1 <= limit:
            out.append(prompt)
            continue
        ids = tok.source_tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]  # no length warning
        if len(ids) + 1 <= limit:
            out.append(prompt)
            continue
        if not truncate:
            raise UsageError(
                f"prompt {i} is {len(data):,} bytes, about {len(ids):,} patches (its source tokens), more than the "
                f"global model's context of {limit:,} patches; shorten it, or pass --truncate to keep its last "
                f"{budget - 1:,} tokens"
            )
        _, lengths = tok.source_bytes_and_patches(ids[len(ids) - (budget - 1):])
        data = data[len(data) - int(sum(lengths)):]
        for _ in range(TRUNCATE_PASSES):
            ends = predicted_patch_ends(model, data)[:-1].numpy()  # decoding counts the ends before the last byte
            excess = int(ends.sum()) - budget
            if excess <= 0:
                break
            data = data[np.flatnonzero(ends[1:])[excess - 1] + 1:]  # drop the first patches in excess
        else:
            raise ContextError(f"prompt {i} could not be cut to fit the global model's context of {limit:,} patches")
        out.append(data.decode("utf-8", "surrogateescape"))
    return out
