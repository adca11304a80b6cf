"""The `bytelift` command."""

from __future__ import annotations

import argparse
import sys

PLANNED = {
    "convert": "byteify a source model end to end (stage 1, stage 2, evaluation)",
    "train": "run stage 1 or stage 2 training",
    "generate": "generate text with a byteified model",
    "eval": "evaluate a byteified model against its source",
    "show": "show predicted patch boundaries against the source tokenizer",
}


def _cmd_tokenize(args) -> int:
    from bytelift.sources import load_source_tokenizer
    from bytelift.tokenization import ByteTokenizer

    tok = ByteTokenizer.from_source(load_source_tokenizer(args.source))
    text = args.text if args.text is not None else sys.stdin.read()
    enc = tok(text)
    src = tok.source_tokenizer
    print(f"{len(enc['input_ids'])} byte ids (with bos); source tokens: {len(src.encode(text, add_special_tokens=False))}")
    print("pos  byte  longest source token ending here")
    for t, (b, s) in enumerate(zip(enc["input_ids"], enc["expanded_ids"])):
        sym = tok.convert_ids_to_tokens(b)
        piece = src.convert_ids_to_tokens(s) if s < len(src) else "<no subword>"
        print(f"{t:>3}  {sym!s:>5}  {piece}")
    return 0


def _cmd_info(args) -> int:
    from bytelift.modeling import ByteliftForCausalLM, count_parameters, format_parameter_counts

    model = ByteliftForCausalLM.from_source(args.source)
    src = model.config.source_config
    print(f"source: {args.source} ({src.model_type}, d={src.hidden_size}, layers={src.num_hidden_layers})")
    print(f"local width {model.config.local_hidden_size}, heads {model.config.local_heads}, "
          f"ffn {model.config.local_ffn_size}, encoder/decoder blocks {model.config.encoder_layers}/"
          f"{model.config.decoder_layers}")
    print("parameters: " + format_parameter_counts(count_parameters(model)))
    return 0


def _planned(name):
    def run(args) -> int:
        print(f"bytelift {name}: not available in this version yet ({PLANNED[name]}).", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bytelift",
        description="Turn a pretrained subword causal LM into a byte-level LM (the Bolmo method).",
    )
    from bytelift import __version__

    parser.add_argument("--version", action="version", version=f"bytelift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tokenize", help="show the byte ids and longest-suffix source tokens of a text")
    p.add_argument("text", nargs="?", help="text (default: stdin)")
    p.add_argument("--source", default="smollm2-135m", help="packaged source name, HF folder or .gguf file")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("info", help="build the byteified model of a source and report its parameters")
    p.add_argument("--source", default="smollm2-135m", help="packaged source name, HF folder or .gguf file")
    p.set_defaults(func=_cmd_info)

    for name, help_text in PLANNED.items():
        p = sub.add_parser(name, help=help_text + " (coming)")
        p.set_defaults(func=_planned(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
