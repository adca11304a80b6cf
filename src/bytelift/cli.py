"""The `bytelift` command."""

from __future__ import annotations

import argparse
import os
import sys

from bytelift.allocator import tune_allocator
from bytelift.checks import (
    CommandParser,
    UsageError,
    finite_float,
    float_at_least,
    fraction,
    int_at_least,
    model_folder,
    nonnegative_float,
    nonnegative_int,
    output_folder,
    positive_float,
    positive_int,
    probability,
    readable_file,
    run_command,
    usage_errors,
    writable_file,
)


def _cmd_tokenize(args) -> int:
    from bytelift.sources import check_source
    from bytelift.tokenization import BYTE_OFFSET, ByteTokenizer

    tok = ByteTokenizer.from_source(check_source(args.source, model=False))
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
    from bytelift.sources import check_source

    check_source(args.source)
    model = ByteliftForCausalLM.from_source(args.source)
    src = model.config.source_config
    print(f"source: {args.source} ({src.model_type}, d={src.hidden_size}, layers={src.num_hidden_layers})")
    print(f"local width {model.config.local_hidden_size}, heads {model.config.local_heads}, "
          f"ffn {model.config.local_ffn_size}, encoder/decoder blocks {model.config.encoder_layers}/"
          f"{model.config.decoder_layers}")
    print("parameters: " + format_parameter_counts(count_parameters(model)))
    return 0


def _stdin_text() -> str:
    """All of stdin; invalid UTF-8 bytes survive (surrogateescape, which the byte tokenizer maps back to the
    same bytes). A replaced text stream without bytes underneath is read as text."""
    buffer = getattr(sys.stdin, "buffer", None)
    return sys.stdin.read() if buffer is None else buffer.read().decode("utf-8", "surrogateescape")


def _prompt_lines(path: str) -> list[str]:
    """One prompt per line of the file ('-' = stdin); blank lines are skipped, and invalid UTF-8 bytes survive
    (surrogateescape, as in `_stdin_text`)."""
    if path == "-":
        text = _stdin_text()
    else:
        with open(readable_file(path, "prompt file"), "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    return [line for line in lines if line]


def _cmd_generate(args) -> int:
    import torch

    from bytelift.checks import fit_prompts
    from bytelift.modeling import ByteliftForCausalLM
    from bytelift.sources import check_source
    from bytelift.streaming import ByteTextStreamer

    positional = list(args.args)
    if args.source is None:
        if not positional:
            raise UsageError("give a MODEL folder (or --source NAME)")
        model_path = model_folder(positional.pop(0))
    else:
        check_source(args.source)
    for path in args.file or []:
        if path != "-":
            readable_file(path, "prompt file")
    if any(not stop for stop in args.stop or []):
        raise UsageError("--stop needs a non-empty string")
    if args.source is None:
        model = ByteliftForCausalLM.from_pretrained(model_path)
    else:
        model = ByteliftForCausalLM.from_source(args.source)
    model.eval()
    if model.tokenizer is None:
        raise UsageError("the model folder has no byte tokenizer")
    prompts = []
    for item in positional:
        prompts.append(_stdin_text() if item == "-" else item)
    for path in args.file or []:
        prompts.extend(_prompt_lines(path))
    if not prompts:
        prompts.append(_stdin_text())
    prompts = fit_prompts(model, prompts, args.max_new_bytes, truncate=args.truncate)
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
    size = args.batch_size
    for start in range(0, len(prompts), size):
        out = model.generate(prompts[start : start + size], return_dict=True, **kwargs)
        for i, text in enumerate(out.texts, start=start):
            if len(prompts) > 1:
                print(f"=== {i} ===")
            print(text)
    return 0


def _minutes_list(text: str) -> tuple[float, ...]:
    """'5,10,15' -> (5.0, 10.0, 15.0), each a positive number (positive_float's check and message)."""
    return tuple(positive_float(m.strip()) for m in text.split(",") if m.strip())


def _key_values(items: list[str] | None, flag: str) -> dict:
    """KEY=VALUE options (repeatable) -> {key: YAML-parsed value (`configuration.load_yaml`: 1e-3 is a
    number)}; dashes in keys read as underscores."""
    import yaml

    from bytelift.configuration import load_yaml

    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        with usage_errors(yaml.YAMLError):
            values[key.replace("-", "_")] = load_yaml(value)
    return values


def _cmd_train(args) -> int:
    import json

    import yaml

    from bytelift.training import TrainConfig, train

    overrides = _key_values(args.set, "--set")
    for key in ("stage", "source", "init_from", "data", "output", "max_steps", "batch_size", "window_tokens", "lr",
                *CORPUS_FIELDS, "data_weights", "heldout_fraction"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume"] = True
    with usage_errors(yaml.YAMLError):
        cfg = (TrainConfig.from_file(readable_file(args.config, "config file"), **overrides) if args.config
               else TrainConfig.from_values(overrides))
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval_config(args):
    from bytelift.evaluation.runner import EvalConfig

    values = {k: getattr(args, k) for k in (*EVAL_COUNTS, *CORPUS_FIELDS, "heldout_fraction")
              if getattr(args, k, None) is not None}
    return EvalConfig(**values)


def _recorded_source(model: str, given: str | None) -> str:
    """The source model to load beside a byte model: the given one, or the one its config records."""
    import json

    from pathlib import Path

    name = given or json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get("source_name_or_path")
    if not name:
        raise UsageError(f"{model} does not record its source model: pass --source")
    return name


def _cmd_eval(args) -> int:
    import dataclasses

    from bytelift.evaluation.report import markdown, write_report
    from bytelift.evaluation.runner import evaluate, heldout_documents, load_pair, torch_threads, training_logs
    from bytelift.sources import check_source

    model_folder(args.model)
    report = args.report or f"{args.model.rstrip('/')}/report"
    output_folder(report, "report folder")
    cfg = _eval_config(args)
    heldout = None
    if args.data:
        cfg = dataclasses.replace(cfg, data=list(args.data))
        if cfg.heldout_docs > 0:  # read once, before any model loads: a corpus without held-out text is refused
            heldout = heldout_documents(cfg)
            if not heldout:
                raise UsageError(f"no held-out documents in {cfg.data} (held-out fraction {cfg.heldout_fraction}) "
                                 "to score")
    device = _device(args.device)
    name = _recorded_source(args.model, args.source)
    check_source(name)
    torch_threads(args.threads)
    model, source, name = load_pair(args.model, name, device)
    results = evaluate(model, source, cfg, heldout=heldout)
    results["meta"] = {"model": args.model, "source": name}
    written = write_report(results, report, training_logs(args.model))
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _device(name: str | None) -> str | None:
    """A torch device the machine has (UsageError otherwise)."""
    if name is None:
        return None
    import torch

    with usage_errors(RuntimeError):
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name}: MPS is not available on this machine")
    return name


def _cmd_calibrate(args) -> int:
    import json
    from pathlib import Path

    from bytelift.calibration import calibrate_boundary_bias
    from bytelift.corpus_reading import corpus_options
    from bytelift.evaluation import tasks as T
    from bytelift.evaluation.runner import default_heldout_data, torch_threads
    from bytelift.modeling import ByteliftForCausalLM
    from bytelift.training_callbacks import write_json_atomically

    model_folder(args.model)
    config_file = Path(args.model) / "config.json"
    writable_file(config_file, "model config")
    config = json.loads(config_file.read_text())
    if args.bias is not None:
        bias = args.bias
        print(f"decode_boundary_bias {config.get('decode_boundary_bias', 0.0):+.4f} -> {bias:+.4f} (given)")
    else:
        options = corpus_options(_eval_config(args))
        data = args.data or default_heldout_data()
        texts = T.heldout_texts(data, args.docs, args.doc_bytes, **options)  # read before the model loads
        if not texts:
            raise UsageError(f"no held-out documents in {data} (held-out fraction {args.heldout_fraction})")
        torch_threads(args.threads)
        model = ByteliftForCausalLM.from_pretrained(args.model).eval()
        size = 8
        batches = (model.tokenizer(texts[i : i + size], padding=True, return_tensors="pt")
                   for i in range(0, len(texts), size))
        cal = calibrate_boundary_bias(model, batches)
        bias = cal.bias
        tried = ", ".join(f"{b:+.3f}: {1 / max(r, 1e-9):.2f}" for b, r in cal.trials)
        print(f"the predictor makes {1 / max(cal.target_rate, 1e-9):.2f} bytes/patch on {cal.positions} held-out "
              f"bytes; decoding them (bias: bytes/patch) {tried}; decode_boundary_bias "
              f"{config.get('decode_boundary_bias', 0.0):+.4f} -> {bias:+.4f}")
    if args.dry_run:
        return 0
    config["decode_boundary_bias"] = bias
    write_json_atomically(config_file, config)  # a crash cannot leave a half-written config
    print(f"wrote {config_file}")
    return 0


def _cmd_show(args) -> int:
    from bytelift.evaluation.show import show

    model_folder(args.model)
    if args.html:
        writable_file(args.html, "HTML file")
    text = args.text if args.text is not None else sys.stdin.read()
    if not text:
        raise UsageError("the text is empty: there are no bytes to split into patches")
    with usage_errors():  # the text's own problems (too long for the context, too narrow a width)
        show(args.model, text, html_path=args.html, color=None if not args.no_color else False, width=args.width)
    if args.html:
        print(f"wrote {args.html}")
    return 0


def _cmd_convert(args) -> int:
    from bytelift.convert import ConvertConfig, convert
    from bytelift.evaluation.runner import torch_threads

    values = {k: getattr(args, k) for k in ("source", "output", "budget_minutes", "eval_minutes", "seed",
                                           "window_tokens", "batch_size", "stage1_steps", "stage2_steps",
                                           "target_bytes_per_patch", "stage1_from", "heldout_fraction",
                                           "stage1_share", "stage2_lr", "data_weights", "snapshot_minutes", *CORPUS_FIELDS)
              if getattr(args, k) is not None}
    if args.output is None and args.source is not None:
        values["output"] = f"runs/{os.path.basename(os.path.normpath(args.source)).removesuffix('.gguf')}-bytes"
    with usage_errors():
        cfg = ConvertConfig(**values, data=list(args.data or []), resume=args.resume, eval=_eval_config(args),
                            model=_key_values(args.model_set, "--model-set"),
                            stage1_train=_key_values(args.stage1_set, "--stage1-set"),
                            stage2_train=_key_values(args.stage2_set, "--stage2-set"))
    torch_threads(args.threads)
    convert(cfg)
    return 0


def _cmd_lm_eval(args) -> int:
    from bytelift.evaluation.harness_run import command

    return command(args)


def _cmd_transfer(args) -> int:
    from bytelift.transfer import run_transfer

    return run_transfer(args)


def _cmd_chat(args) -> int:
    from bytelift.chat import run_chat

    return run_chat(args)


DATA_HELP = ("corpus files or folders: text (.txt; --text-suffixes for more), .jsonl/.json, .parquet, datasets "
             "save_to_disk folders, .gz/.zst compressed")


# Evaluation item counts exposed as --flags (EvalConfig fields; loop_bytes counts new bytes per sample).
EVAL_COUNTS = ("heldout_docs", "lambada", "hellaswag", "cute_per_task", "basic_skills", "loop_bytes")


def _add_eval_counts(p) -> None:
    from bytelift.evaluation.runner import EvalConfig

    defaults = EvalConfig()
    for key in EVAL_COUNTS:
        what = "new bytes per greedy sample of the looping check" if key == "loop_bytes" else "items"
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=nonnegative_int,
                       help=f"{what} (default {getattr(defaults, key)}; 0 skips the section)")


def _add_sampling_options(p) -> None:
    """The decoding options `generate` and `chat` share."""
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None)
    p.add_argument("--top-k", type=nonnegative_int, default=None, help="0: no top-k cut")
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--repetition-penalty", type=positive_float, default=None)
    p.add_argument("--seed", type=nonnegative_int, default=None)


# How a corpus is read (TrainConfig / ConvertConfig / EvalConfig fields of these names): --text-field,
# --text-suffixes, --errors.
CORPUS_FIELDS = ("text_field", "text_suffixes", "encoding_errors")


def _add_corpus_options(p, weights: bool = True, heldout: str | None = "as in training (0.01)") -> None:
    """The options of every command that reads a corpus (--data), so that all read it the same way."""
    from bytelift.corpus_reading import ENCODING_ERRORS

    p.add_argument("--text-field", dest="text_field",
                   help="field of JSON/Parquet records holding the text (default text); a dotted path for nested "
                        "records: meta.body")
    p.add_argument("--text-suffixes", dest="text_suffixes", nargs="+", metavar="SUFFIX",
                   help="file suffixes read as plain text (default .txt), e.g. .txt .md .rst .py")
    p.add_argument("--errors", dest="encoding_errors", choices=ENCODING_ERRORS,
                   help="invalid UTF-8: strict refuses it, naming the file and byte offset (default); replace reads "
                        "it as U+FFFD; skip leaves the file out")
    if weights:
        p.add_argument("--weights", dest="data_weights", nargs="+", type=positive_float, metavar="W",
                       help="one mixing weight per --data path: its share of the training bytes")
    if heldout:
        p.add_argument("--heldout-fraction", dest="heldout_fraction", type=fraction, help=heldout)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
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
                   help="a saved bytelift folder (omit with --source), then prompts ('-' = all of stdin as one "
                        "prompt; no prompt and no --file: the same)")
    p.add_argument("--source", help="byteify this source on the fly instead (untrained: smoke tests only)")
    p.add_argument("--file", action="append",
                   help="read prompts from this file, one per line, blank lines skipped ('-' = stdin; repeatable)")
    p.add_argument("--max-new-bytes", type=nonnegative_int, default=128)
    p.add_argument("--truncate", action="store_true",
                   help="cut a prompt longer than the global model's context from the left (default: refuse it)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together")
    _add_sampling_options(p)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train",
        help="run stage 1 (distillation) or stage 2 (end to end) training",
        description="Train a byteified model. Works the same under `torchrun --nproc-per-node N`.",
    )
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: distil the source (default), 2: end to end")
    p.add_argument("--source", help="stage 1: source to byteify (packaged name, HF folder or .gguf)")
    p.add_argument("--init-from", dest="init_from", help="stage 2: the stage-1 model folder")
    p.add_argument("--data", nargs="+", help=DATA_HELP)
    _add_corpus_options(p)
    p.add_argument("--output", help="output folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields; flags override it")
    p.add_argument("--max-steps", dest="max_steps", type=positive_int)
    p.add_argument("--batch-size", dest="batch_size", type=positive_int)
    p.add_argument("--window-tokens", dest="window_tokens", type=int_at_least(2))
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig field")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "convert", help="byteify a model end to end: stage 1, stage 2, evaluation, samples",
        description="The main job. Defaults: the packaged SmolLM2-135M on the built-in corpus, 30 minutes.",
    )
    p.add_argument("--source", help="packaged name (default smollm2-135m), HF folder or .gguf file")
    p.add_argument("--data", nargs="+", help=DATA_HELP + " (default: the built-in corpus)")
    _add_corpus_options(p)
    p.add_argument("--output", help="output folder (default runs/<source>-bytes)")
    p.add_argument("--budget-minutes", dest="budget_minutes", type=positive_float, help="whole job (default 30)")
    p.add_argument("--eval-minutes", dest="eval_minutes", type=nonnegative_float,
                   help="reserve for evaluation and samples, within the budget (default: estimated from the "
                        "evaluation's items and a probe of this machine's speed)")
    p.add_argument("--snapshot-minutes", dest="snapshot_minutes", type=_minutes_list, metavar="M1,M2,...",
                   help="keep the model after these training minutes in <output>/stage<k>/snapshots/ "
                        "(a learning curve from one run: benchmarks/learning_curve.py)")
    p.add_argument("--model-set", dest="model_set", action="append", metavar="KEY=VALUE",
                   help="a ByteliftConfig field of the new model, e.g. source_prior=false (repeatable)")
    p.add_argument("--stage1-set", dest="stage1_set", action="append", metavar="KEY=VALUE",
                   help="a TrainConfig field of stage 1, e.g. lr=1e-3 (repeatable; see `bytelift train`)")
    p.add_argument("--stage2-set", dest="stage2_set", action="append", metavar="KEY=VALUE",
                   help="a TrainConfig field of stage 2, e.g. global_lr=5e-5 (repeatable)")
    p.add_argument("--stage1-share", dest="stage1_share", type=fraction,
                   help="stage 1's share of the training minutes (default 0.35)")
    p.add_argument("--stage2-lr", dest="stage2_lr", type=positive_float,
                   help="stage 2's local learning rate; the global model's is half (default 2e-4)")
    p.add_argument("--stage1-steps", dest="stage1_steps", type=positive_int, help="fixed steps instead of time")
    p.add_argument("--stage2-steps", dest="stage2_steps", type=positive_int, help="fixed steps instead of time")
    p.add_argument("--stage1-from", dest="stage1_from",
                   help="start stage 2 from this finished stage-1 model folder (stage 1 is skipped)")
    p.add_argument("--bytes-per-patch", dest="target_bytes_per_patch", type=float_at_least(1),
                   help="stage 2 merges patches up to this many bytes each (default: the source's tokens); "
                        "longer patches generate faster")
    p.add_argument("--window-tokens", dest="window_tokens", type=int_at_least(2))
    p.add_argument("--batch-size", dest="batch_size", type=positive_int)
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion in --output (a new or empty one: start it)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    _add_eval_counts(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("eval", help="evaluate a byteified model against its source, side by side")
    p.add_argument("model", help="a bytelift model folder")
    p.add_argument("--source", help="the source model (default: the one recorded in the model's config)")
    p.add_argument("--report", help="report folder (default MODEL/report)")
    p.add_argument("--data", nargs="+", help="corpus whose held-out split is scored (default: built-in corpus)")
    _add_corpus_options(p, weights=False)
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    _add_eval_counts(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "lm-eval", help="run lm-evaluation-harness tasks on a byteified model and its source, side by side",
        description="Needs the eval extra (pip install 'bytelift[eval]'). --export-tasks DIR writes bytelift's "
                    "offline evaluation data as harness tasks; --include-path DIR runs them without hub access.",
    )
    from bytelift.evaluation.harness_run import add_arguments as _add_lm_eval_arguments

    _add_lm_eval_arguments(p)
    p.set_defaults(func=_cmd_lm_eval)

    p = sub.add_parser(
        "calibrate", help="set a model's decoding threshold so that generation closes patches at the trained rate",
        description="Training calibrates at its end; this re-does it on other text, or sets a given bias.",
    )
    p.add_argument("model", help="a bytelift model folder (its config.json is updated)")
    p.add_argument("--data", nargs="+", help="corpus whose held-out split is read (default: built-in corpus)")
    _add_corpus_options(p, weights=False, heldout=None)
    p.add_argument("--heldout-fraction", dest="heldout_fraction", type=fraction, default=0.01,
                   help="as in training (0.01)")
    p.add_argument("--docs", type=positive_int, default=32, help="held-out documents read (default 32)")
    p.add_argument("--doc-bytes", dest="doc_bytes", type=positive_int, default=512,
                   help="bytes per document (512; 8 KB in all are decoded, 16 rows at a time)")
    p.add_argument("--bias", type=finite_float,
                   help="set this decode_boundary_bias instead (0: the reference's 1/2)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="report, do not write")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("show", help="show predicted patch boundaries against the source tokenizer's tokens")
    p.add_argument("model", help="a bytelift model folder")
    p.add_argument("text", nargs="?", help="text (default: stdin)")
    p.add_argument("--html", help="also write an HTML view to this file")
    p.add_argument("--no-color", action="store_true", help="plain text with | between segments")
    p.add_argument("--width", type=positive_int, default=100)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser(
        "transfer", help="add a fine-tune's weight delta (POST - BASE) to a byte model: post-training for free",
        description="Task arithmetic on the global model (the source transformer): no byte-level training.",
    )
    p.add_argument("model", help="a bytelift model folder")
    p.add_argument("--base", required=True, help="the checkpoint POST was tuned from (packaged name, HF folder, .gguf)")
    p.add_argument("--post", required=True, help="the post-trained checkpoint (packaged name, HF folder, .gguf)")
    p.add_argument("--output", required=True, help="new model folder (must not exist)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the delta (default 1.0)")
    p.add_argument("--subword-embedding-delta", dest="subword_embedding_delta",
                   action=argparse.BooleanOptionalAction, help="also add the input embedding's delta to the "
                   "encoder's subword table (default: off, measured)")
    p.add_argument("--prior-head-delta", dest="prior_head_delta", action=argparse.BooleanOptionalAction,
                   help="also add the LM head's delta to the source prior's head (default: on, measured)")
    p.set_defaults(func=_cmd_transfer)

    p = sub.add_parser("chat", help="chat with a byte model in the terminal (its source's chat template)",
                       description="Ctrl-C stops the current answer, Ctrl-D quits.")
    p.add_argument("model", help="a bytelift model folder whose source tokenizer has a chat template")
    p.add_argument("--system", help="system message (default: the template's own, if it has one)")
    p.add_argument("--max-new-bytes", type=int, default=None, help="new bytes per answer")
    _add_sampling_options(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run a command. Usage errors of every command (checks.UsageError, refused paths) are one
    line on stderr and exit code 2 (`checks.run_command`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    tune_allocator()  # CPU steps reuse freed memory instead of faulting fresh pages in (bytelift.allocator)
    return run_command(args.func, args, f"bytelift {args.command}")


if __name__ == "__main__":
    sys.exit(main())
