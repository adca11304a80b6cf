"""`bytelift chat`: talk to a byte model through its source's chat template, streaming its answers.

`chat_repl` is the loop (it takes the functions that read a line and write text, so tests drive it with
scripted input); `run_chat` is the command: it loads the model and reads from the terminal with line editing.
Each turn renders the whole history with `ByteTokenizer.apply_chat_template` (generation prompt added),
streams the answer until the template's end-of-turn marker (`generate` stops there by default), and keeps the
answer in the history. Ctrl-C while an answer streams stops that answer (a SIGINT handler sets an event that a
`transformers` StoppingCriteria reads after every byte; the partial answer stays in the history); Ctrl-C at
the prompt discards the line; Ctrl-D (end of input) quits.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

import torch
from transformers import StoppingCriteria

from bytelift.streaming import ByteTextStreamer

# Shown before each line the user types.
USER_PROMPT = "> "
# Printed after an answer that Ctrl-C stopped.
STOPPED_NOTE = " [stopped]"
# New bytes per answer unless --max-new-bytes says otherwise (about 250 source tokens of English).
DEFAULT_CHAT_MAX_NEW_BYTES = 1024


class InterruptCriteria(StoppingCriteria):
    """Stops every row once `event` is set (by the SIGINT handler of `_sigint_sets`)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextmanager
def _sigint_sets(event: threading.Event):
    """While inside, SIGINT (Ctrl-C) sets `event` instead of raising KeyboardInterrupt. Outside the main thread
    signals cannot be handled: KeyboardInterrupt stays (the caller catches it too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_repl(model, system: str | None = None, read=input, write=None, **generate_kwargs) -> list[dict]:
    """Run the chat loop until end of input; returns the conversation.

    Args:
        model: a ByteliftForCausalLM with its byte tokenizer attached (whose source has a chat template).
        system: a system message opening the conversation (None: the template's default, if any).
        read: called with the prompt string, returns the user's line; EOFError ends the chat, KeyboardInterrupt
            discards the line.
        write: called with each piece of output text (default: stdout, flushed).
        generate_kwargs: passed to `model.generate` (max_new_bytes, do_sample, temperature, ...).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no byte tokenizer attached")
    tokenizer.chat_source_tokenizer()  # a clear error now, not after the first line
    if write is None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
    generate_kwargs.setdefault("max_new_bytes", DEFAULT_CHAT_MAX_NEW_BYTES)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read(USER_PROMPT)
        except EOFError:
            write("\n")
            return messages
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        pieces: list[str] = []

        def emit(text: str) -> None:
            pieces.append(text)
            write(text)

        stop = threading.Event()
        streamer = ByteTextStreamer(on_text=emit, hold_back=tokenizer.end_of_turn_stop)
        try:
            with _sigint_sets(stop):
                model.generate(**batch, streamer=streamer, stopping_criteria=[InterruptCriteria(stop)],
                               **generate_kwargs)
        except KeyboardInterrupt:  # outside the main thread Ctrl-C still raises
            stop.set()
        write((STOPPED_NOTE if stop.is_set() else "") + "\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})


def run_chat(args) -> int:
    """`bytelift chat MODEL [--system TEXT] [generation options]` (options registered in `bytelift.cli`)."""
    from bytelift.modeling import ByteliftForCausalLM, check_model_folder

    try:
        check_model_folder(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"bytelift chat: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ByteliftForCausalLM.from_pretrained(args.model).eval()
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and ↑/↓ history for input())
    kwargs = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.max_new_bytes is not None:
        kwargs["max_new_bytes"] = args.max_new_bytes
    try:
        chat_repl(model, system=args.system, **kwargs)
    except ValueError as err:
        print(f"bytelift chat: {err}", file=sys.stderr)
        return 2
    return 0

