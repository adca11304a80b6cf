"""The `bytelift` command."""

from __future__ import annotations

import argparse
import sys

PLANNED = {
    "convert": "byteify a source model end to end (stage 1, stage 2, evaluation)",
    "eval": "evaluate a byteified model against its source",
    "show": "show predicted patch boundaries against the source tokenizer",
}


def _cmd_tokenize(args) -> int:
    from bytelift.sources import load_source_tokenizer
    from bytelift.tokenization import BYTE_OFFSET, ByteTokenizer

    tok = ByteTokenizer.from_source(load_source_tokenizer(args.source))
    text = args.text if args.text is not None else sys.stdin.read()
    enc = tok(text)
    src = tok.source_tokenizer
    print(f"{len(enc['input_ids'])} byte ids (with bos); source tokens: {len(src.encode(text, add_special_tokens=False))}")
    print("pos  byte       longest source token ending here (id: bytes)")
    token_bytes = tok.source_vocab.token_bytes
    for t, (b, s) in enumerate(zip(enc["input_ids"], enc["expanded_ids"])):
        value = b - BYTE_OFFSET
        printable = repr(chr(value)) if 32 <= value < 127 else ""
        symbol = tok.convert_ids_to_tokens(b) if b < BYTE_OFFSET else f"0x{value:02x} {printable}"
        piece = repr(token_bytes[s]) if s < len(token_bytes) and token_bytes[s] is not None else "<special/none>"
        print(f"{t:>3}  {symbol:<10} {s}: {piece}")
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


def _cmd_generate(args) -> int:
    import torch

    from bytelift.generation import ByteTextStreamer
    from bytelift.modeling import ByteliftForCausalLM

    positional = list(args.args)
    if args.source is None:
        if not positional:
            print("bytelift generate: give a MODEL folder (or --source NAME)", file=sys.stderr)
            return 2
        model_path = positional.pop(0)
        model = ByteliftForCausalLM.from_pretrained(model_path)
    else:
        model = ByteliftForCausalLM.from_source(args.source)
    model.eval()
    if model.tokenizer is None:
        print("bytelift generate: the model folder has no byte tokenizer", file=sys.stderr)
        return 2
    prompts = []
    for item in positional:
        prompts.append(sys.stdin.read() if item == "-" else item)
    for path in args.file or []:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            prompts.append(f.read())
    if not prompts:
        prompts.append(sys.stdin.read())
    kwargs = dict(
        max_new_bytes=args.max_new_bytes, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_strings=args.stop or None,
        seed=args.seed, eos=not args.no_eos,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream:
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"=== {i} ===")
            model.generate([prompt], streamer=ByteTextStreamer(), **kwargs)
            print()
        return 0
    size = max(1, args.batch_size)
    for start in range(0, len(prompts), size):
        out = model.generate(prompts[start : start + size], return_dict=True, **kwargs)
        for i, text in enumerate(out.texts, start=start):
            if len(prompts) > 1:
                print(f"=== {i} ===")
            print(text)
    return 0


def _cmd_train(args) -> int:
    import json

    import yaml

    from bytelift.training import TrainConfig, train

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    for key in ("stage", "source", "init_from", "data", "output", "max_steps", "batch_size", "window_tokens", "lr"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume"] = True
    cfg = TrainConfig.from_file(args.config, **overrides) if args.config else TrainConfig(**overrides)
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
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

    p = sub.add_parser("generate", help="generate text with a byteified model")
    p.add_argument("args", nargs="*", metavar="[MODEL] PROMPT",
                   help="a saved bytelift folder (omit with --source), then prompts ('-' = stdin; none: stdin)")
    p.add_argument("--source", help="byteify this source on the fly instead (untrained: smoke tests only)")
    p.add_argument("--file", action="append", help="read a prompt from this file (repeatable)")
    p.add_argument("--max-new-bytes", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train",
        help="run stage 1 (distillation) or stage 2 (end to end) training",
        description="Train a byteified model. Works the same under `torchrun --nproc-per-node N`.",
    )
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: distil the source (default), 2: end to end")
    p.add_argument("--source", help="stage 1: source to byteify (packaged name, HF folder or .gguf)")
    p.add_argument("--init-from", dest="init_from", help="stage 2: the stage-1 model folder")
    p.add_argument("--data", nargs="+", help="txt/jsonl/parquet files or folders")
    p.add_argument("--output", help="output folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields; flags override it")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--window-tokens", dest="window_tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig field")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.set_defaults(func=_cmd_train)

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
