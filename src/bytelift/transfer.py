"""Post-training for free: add a fine-tune's weight delta to a byte model's global model (task arithmetic).

The global model *is* the source transformer, so a post-trained checkpoint of the same source (instruction
tuning, RL, a domain fine-tune) moves it as it moved the source: θ_global += scale · (θ_post − θ_base), parameter
by parameter, with no byte-level training. The local modules (encoder, boundary predictor, decoder, byte head)
were trained against the source's states and stay as they are.

Two parts of a byte model were initialised from the source outside its transformer: the encoder's subword
embedding table (a copy of the source's input embedding) and `prior_head` (the source's LM head, which the source
prior reads; `bytelift.prior`). Whether they take their source counterparts' delta too is a choice
(`subword_embedding_delta`, `prior_head_delta`); the defaults are what measured best (README, "Post-training for
free"): the prior head takes it — it turns the global model's states into the next-token distribution the
post-trained source would give — and the subword table does not.

    bytelift transfer runs/job --base smollm2-135m --post runs/my-finetune --output runs/job-finetuned

BASE and POST may be anything `bytelift.sources.load_source` reads (a packaged name, an HF folder or hub id in
the local cache, a `.gguf` file). Both must have the byte model's source architecture, parameter shapes and
vocabulary; everything is checked before a byte is written.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bytelift.modeling import ByteliftForCausalLM, check_model_folder

# Defaults of the two choices above (measured: README, "Post-training for free").
DEFAULT_SUBWORD_EMBEDDING_DELTA = False
DEFAULT_PRIOR_HEAD_DELTA = True
# Source config entries that change what the transformer computes without changing any parameter's shape: a
# checkpoint that differs in one of them is not the same architecture, whatever its shapes.
COMPUTE_CONFIG_KEYS = (
    "hidden_act", "hidden_activation", "activation_function", "rms_norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "rope_theta", "rope_parameters", "rope_scaling", "sliding_window", "attn_logit_softcapping",
    "final_logit_softcapping", "query_pre_attn_scalar", "tie_word_embeddings",
)
# Relative tolerance of float config entries: a GGUF file stores them as float32 (1e-5 reads 9.9999997e-06).
CONFIG_FLOAT_RTOL = 1e-6


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=CONFIG_FLOAT_RTOL)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _transformer_parameters(source: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The source transformer's parameters by name, without its input embedding (which a byte model's global
    model does not have: the encoder's subword table stands in for it)."""
    embedding = source.get_input_embeddings()
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return {n: p for n, p in source.base_model.named_parameters() if id(p) not in skip}


def check_transferable(model: ByteliftForCausalLM, source: PreTrainedModel, tokenizer, what: str) -> None:
    """Raise a ValueError naming the first difference between `source` (with its `tokenizer`) and the byte
    model's source: architecture, a computation-defining config entry, a parameter name or shape, a vocabulary
    entry. `what` names the checkpoint in the message (e.g. "--post runs/ft")."""
    own = model.config.source_config
    if source.config.model_type != own.model_type or type(source.base_model) is not type(model.global_model):
        raise ValueError(
            f"{what} is a {source.config.model_type} model ({type(source.base_model).__name__}); the byte model's "
            f"global model is a {own.model_type} ({type(model.global_model).__name__})"
        )
    mine, theirs = own.to_dict(), source.config.to_dict()
    for key in COMPUTE_CONFIG_KEYS:
        if not _same(mine.get(key), theirs.get(key)):
            raise ValueError(f"{what} has {key}={theirs.get(key)!r}; the byte model's source has {mine.get(key)!r}")
    params = _transformer_parameters(source)
    for name, param in model.global_model.named_parameters():
        if name not in params:
            raise ValueError(f"{what} has no parameter {name}, which the byte model's global model has")
        if params[name].shape != param.shape:
            raise ValueError(
                f"{what}: parameter {name} has shape {tuple(params[name].shape)}; the byte model's global model "
                f"has {tuple(param.shape)}"
            )
    extra = sorted(set(params) - {n for n, _ in model.global_model.named_parameters()})
    if extra:
        raise ValueError(f"{what} has a parameter the byte model's global model lacks: {extra[0]}")
    _check_vocabulary(model.tokenizer.source_tokenizer, tokenizer, what)
    head, own_head = source.get_output_embeddings(), model.prior_head
    if own_head is not None and (head is None or head.weight.shape != own_head.weight.shape):
        shape = None if head is None else tuple(head.weight.shape)
        raise ValueError(
            f"{what}: LM head of shape {shape}; the byte model's prior head has {tuple(own_head.weight.shape)}"
        )


def _check_vocabulary(reference, tokenizer, what: str) -> None:
    mine, theirs = reference.get_vocab(), tokenizer.get_vocab()
    if mine == theirs:
        return
    by_id_mine = {i: t for t, i in mine.items()}
    by_id_theirs = {i: t for t, i in theirs.items()}
    for i in range(max(len(by_id_mine), len(by_id_theirs), max(by_id_mine) + 1, max(by_id_theirs) + 1)):
        if by_id_mine.get(i) != by_id_theirs.get(i):
            raise ValueError(
                f"{what}'s tokenizer has {by_id_theirs.get(i)!r} at id {i}; the byte model's source tokenizer has "
                f"{by_id_mine.get(i)!r} (a transfer needs the same vocabulary)"
            )


@torch.no_grad()
def _embedding_outputs(source: PreTrainedModel, rows: int) -> torch.Tensor:
    """(rows, d_g) the source's input embedding module's output for ids 0..rows-1, as `from_source` copies it
    (some families scale inside the module)."""
    embedding = source.get_input_embeddings()
    ids = torch.arange(rows, device=embedding.weight.device)
    return embedding(ids).float()


@torch.no_grad()
def add_delta(
    model: ByteliftForCausalLM,
    base: PreTrainedModel,
    post: PreTrainedModel,
    scale: float = 1.0,
    subword_embedding_delta: bool = DEFAULT_SUBWORD_EMBEDDING_DELTA,
    prior_head_delta: bool = DEFAULT_PRIOR_HEAD_DELTA,
) -> None:
    """In place: every global-model parameter += scale · (post − base) (computed in float32); optionally the
    same for the encoder's subword table (from the embedding modules' outputs, the source rows only) and the
    prior head (weight and bias). Call `check_transferable` on both checkpoints first."""
    base_params, post_params = _transformer_parameters(base), _transformer_parameters(post)
    for name, param in model.global_model.named_parameters():
        delta = post_params[name].float() - base_params[name].float()
        param.copy_((param.float() + scale * delta.to(param.device)).to(param.dtype))
    if subword_embedding_delta:
        table = model.encoder.subword_embedding.weight
        rows = model.config.subword_vocab_size - 1  # the last row is "no subword", not a source token
        delta = _embedding_outputs(post, rows) - _embedding_outputs(base, rows)
        table[:rows] = (table[:rows].float() + scale * delta.to(table.device)).to(table.dtype)
    if prior_head_delta and model.prior_head is not None:
        post_head, base_head = post.get_output_embeddings(), base.get_output_embeddings()
        for name, param in model.prior_head.named_parameters():
            delta = getattr(post_head, name).float() - getattr(base_head, name).float()
            param.copy_((param.float() + scale * delta.to(param.device)).to(param.dtype))


def transfer(
    byte_model: str | os.PathLike,
    base: str | os.PathLike,
    post: str | os.PathLike,
    output: str | os.PathLike,
    scale: float = 1.0,
    subword_embedding_delta: bool = DEFAULT_SUBWORD_EMBEDDING_DELTA,
    prior_head_delta: bool = DEFAULT_PRIOR_HEAD_DELTA,
) -> ByteliftForCausalLM:
    """Write `output`: the byte model in `byte_model` with scale · (POST − BASE) added (see `add_delta`).

    The output is a normal byte-model folder (safetensors; `AutoModelForCausalLM.from_pretrained` after
    `import bytelift`) whose config lists the transfer in `transfers` (base, post, scale, the two choices, and
    whether the chat template came from POST: it does when POST's tokenizer has one that differs, so that an
    instruction delta brings the template its model was tuned on). Nothing is written unless every check
    passes; the folder appears whole or not at all.
    """
    from bytelift.sources import load_source

    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} already exists; choose a new --output")
    check_model_folder(byte_model)
    model = ByteliftForCausalLM.from_pretrained(byte_model)
    if model.tokenizer is None or model.tokenizer.source_tokenizer is None:
        raise ValueError(f"{byte_model} has no source tokenizer to check BASE and POST against")
    loaded = {}
    for flag, name in (("--base", base), ("--post", post)):
        source, tokenizer = load_source(name)
        check_transferable(model, source, tokenizer, f"{flag} {name}")
        loaded[flag] = source, tokenizer
    (base_model, _), (post_model, post_tokenizer) = loaded["--base"], loaded["--post"]
    add_delta(model, base_model, post_model, scale, subword_embedding_delta, prior_head_delta)

    source_tokenizer = model.tokenizer.source_tokenizer
    template = getattr(post_tokenizer, "chat_template", None)
    template_from_post = bool(template) and template != source_tokenizer.chat_template
    if template_from_post:
        source_tokenizer.chat_template = template
        model.tokenizer.__dict__.pop("_end_of_turn", None)  # re-derived from the new template
    record = {"base": str(base), "post": str(post), "scale": float(scale),
              "subword_embedding_delta": bool(subword_embedding_delta), "prior_head_delta": bool(prior_head_delta),
              "chat_template": "post" if template_from_post else "kept"}
    model.config.transfers = [*(model.config.transfers or []), record]
    _save_whole(model, output)
    return model


def _save_whole(model: ByteliftForCausalLM, output: Path) -> None:
    """Save into a temporary sibling folder, then rename it: an interrupted save leaves nothing behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_transfer(args) -> int:
    """`bytelift transfer MODEL --base BASE --post POST --output OUT [--scale S]` (options in `bytelift.cli`)."""
    kwargs = {k: getattr(args, k) for k in ("subword_embedding_delta", "prior_head_delta")
              if getattr(args, k) is not None}
    try:
        model = transfer(args.model, args.base, args.post, args.output, scale=args.scale, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"bytelift transfer: {err}", file=sys.stderr)
        return 2
    record = model.config.transfers[-1]
    print(f"wrote {args.output}: global model + {record['scale']:g} x ({record['post']} - {record['base']}); "
          f"prior head delta {'added' if record['prior_head_delta'] else 'not added'}, subword embedding delta "
          f"{'added' if record['subword_embedding_delta'] else 'not added'}, chat template {record['chat_template']}")
    return 0
