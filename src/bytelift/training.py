"""Training: typed run config, stage set-up (freezing, parameter groups) and a `transformers.Trainer`
subclass (batching, accumulation, AdamW, warmup + linear decay, clipping, checkpoint rotation, resume,
DDP/FSDP under torchrun, TensorBoard when installed, JSONL logs).

    cfg = TrainConfig(stage=1, source="smollm2-135m", data=["corpus/"], output="runs/s1")
    train(cfg)                                   # or: bytelift train --stage 1 --source ... --data ...
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from bytelift.losses import BOUNDARY_WEIGHT, DENSE_DISTILL_WEIGHT, ENCODER_WEIGHT, WHITESPACE_BYTES, LossWeights
from bytelift.modeling import ByteliftForCausalLM, check_model_folder, fold_fused_logprobs
from bytelift.objectives import (
    Stage1Objective,
    Stage2Objective,
    best_f1_threshold,
    boundary_counts,
    decidable_positions,
    precision_recall_f1,
)
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, ByteTokenizer
from bytelift.training_callbacks import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    LOG_NAME,
    JsonlLogger,
    Snapshots,
    ThroughputOnBar,
    TimeBudget,
    latest_complete_checkpoint,
    wall_clock_schedule,
    write_json_atomically,
)

RUN_CONFIG_NAME = "bytelift_train_config.json"
# The Trainer's step limit for a run sized by time (TimeBudget stops it).
UNBOUNDED_STEPS = 10**9
# Parameters whose names contain these never get weight decay (the reference exempts the embeddings;
# norm weights and biases are exempt by common practice).
NO_DECAY_MARKERS = ("byte_embedding", "subword_embedding", "norm", "bias")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training stage. Defaults are the reference's, scaled for small models
    where the reference values assume a cluster (window length, batch, steps)."""

    stage: int = 1
    source: str = "smollm2-135m"  # stage 1: the model to byteify (packaged name, HF folder, .gguf)
    init_from: str | None = None  # stage 2: a stage-1 model folder or checkpoint
    data: list[str] = field(default_factory=list)
    # How the corpus is read (bytelift.corpus_reading): the field of JSON/Parquet records holding the text
    # (a dotted path for nested records), the suffixes read as plain text, invalid UTF-8 ("strict" refuses
    # it naming the file and byte offset, "replace" reads it as U+FFFD, "skip" leaves the file out), and one
    # mixing weight per `data` path (each source's share of the training bytes; None: as read).
    text_field: str = "text"
    text_suffixes: list[str] = field(default_factory=lambda: [".txt"])
    encoding_errors: str = "strict"
    data_weights: list[float] | None = None
    streaming: bool = False  # read the corpus lazily (large corpora) instead of into memory
    output: str = "runs/bytelift"
    window_tokens: int = 256  # reference 4096
    byte_expansion_factor: float = 6.0
    heldout_fraction: float = 0.01
    # Training documents longer than this (UTF-8 bytes) are cut into pieces at line breaks before the document
    # shuffle, so that one long file does not fill a long stretch of steps. None: a few windows' worth
    # (data.DOCUMENT_PIECE_WINDOWS); 0: whole documents. The held-out set is always read whole.
    document_piece_bytes: int | None = None
    batch_size: int = 4  # windows per device per step (reference 32 × 4096 tokens in total)
    grad_accum: int = 1
    # reference 75k (stage 1) / 150k (stage 2). None: the run is sized by `max_minutes` instead, and the
    # learning-rate schedule (warmup, linear decay) follows the fraction of that time spent.
    max_steps: int | None = 1000
    lr: float | None = None  # local lr; default 7e-4 (stage 1) / 5.2e-5 (stage 2)
    global_lr: float | None = None  # stage 2 global lr; default lr / 2
    weight_decay: float = 0.1
    # The boundary predictor's lr relative to the local lr: its projections start at the identity (entries
    # of size 1), so at the local lr a short run barely moves them (A/B in benchmarks/README.md: x10 gave
    # held-out F1 0.958 vs 0.937 after 60 stage-1 steps).
    predictor_lr_scale: float = 10.0
    adam_beta2: float | None = None  # 0.999 (stage 1) / 0.95 (stage 2)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.5
    bf16: bool = False
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int = 200
    eval_windows: int = 32
    # Loss weights (reference values; the dense per-byte distillation, stage 1, is ours: the KL from the
    # teacher's trie marginal at every byte).
    boundary_loss_weight: float = BOUNDARY_WEIGHT
    encoder_loss_weight: float = ENCODER_WEIGHT
    # The encoder loss relative to the teacher's RMS (losses.encoder_loss): scale-free across sources (Gemma's hidden
    # states are ~10x SmolLM2's); at equal steps on SmolLM2 it matched the plain distance (benchmarks/README.md).
    encoder_loss_relative: bool = True
    dense_distill_weight: float = DENSE_DISTILL_WEIGHT
    char_skill_rate: float = 0.0  # stage 2: fraction of character-skill documents mixed in
    target_bytes_per_patch: float | None = None  # stage 2: merge boundaries up to this ratio
    max_minutes: float | None = None  # wall-clock budget: stop (and save) once it is spent
    # Save the byte model (no optimizer) into <output>/snapshots/minute-<m> once m training minutes have passed,
    # counted from `snapshot_offset_minutes` (the minutes earlier stages trained): a learning curve from one run.
    snapshot_minutes: list[float] = field(default_factory=list)
    snapshot_offset_minutes: float = 0.0
    # After training, set the model's decode_boundary_bias so that decoding closes patches at the rate the
    # predictor does (calibration.calibrate_boundary_bias; ~1 min for SmolLM2 on 2 CPU cores).
    calibrate_decoding: bool = True
    # After training, before the decoding calibration, set the predictor's boundary threshold to the one with
    # the best F1 on the held-out windows (the reference's 1/2 is not the best once the predictor's
    # probabilities are biased, e.g. precision 0.999 at recall 0.92 after a short run).
    calibrate_boundaries: bool = True
    fsdp: bool = False
    resume: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # ByteliftConfig overrides (stage 1)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.lr is None:
            self.lr = 7e-4 if self.stage == 1 else 5.2e-5
        if self.global_lr is None:
            self.global_lr = self.lr / 2
        if self.adam_beta2 is None:
            self.adam_beta2 = 0.999 if self.stage == 1 else 0.95
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.text_suffixes, str):
            self.text_suffixes = [self.text_suffixes]
        if self.max_steps is None and not self.max_minutes:
            raise ValueError("give max_steps or max_minutes (a run sized by time needs its budget)")
        self.validate()

    def validate(self) -> None:
        """UsageError (a ValueError) naming the first option out of its range."""
        from bytelift.checks import UsageError, check_number
        from bytelift.corpus_reading import ENCODING_ERRORS

        for name, low, high, optional in (
            ("window_tokens", 2, None, False), ("batch_size", 1, None, False), ("grad_accum", 1, None, False),
            ("max_steps", 1, None, True), ("logging_steps", 1, None, False), ("save_steps", 1, None, False),
            ("save_total_limit", 1, None, False), ("eval_steps", 1, None, False), ("eval_windows", 1, None, False),
            ("seed", 0, None, False), ("target_bytes_per_patch", 1, None, True), ("warmup_ratio", 0, 1, False),
            ("weight_decay", 0, None, False), ("byte_expansion_factor", 1, None, False),
            ("document_piece_bytes", 0, None, True),
        ):
            check_number(name, getattr(self, name), low, high, optional=optional)
        for name in ("lr", "global_lr", "max_grad_norm", "predictor_lr_scale", "max_minutes"):
            check_number(name, getattr(self, name), 0, float("inf"), low_open=True, high_open=True,
                         optional=name == "max_minutes")
        check_number("heldout_fraction", self.heldout_fraction, 0, 1, high_open=True)
        check_number("char_skill_rate", self.char_skill_rate, 0, 1, high_open=True)
        check_number("adam_beta2", self.adam_beta2, 0, 1, low_open=True, high_open=True)
        if self.encoding_errors not in ENCODING_ERRORS:
            raise UsageError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {self.encoding_errors!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """Read a YAML or JSON file; keyword overrides (e.g. from the command line) win."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            from bytelift.configuration import load_yaml

            values = load_yaml(text) or {}
        else:
            values = json.loads(text)
        return cls.from_values({**values, **overrides}, where=f"in {path}")

    @classmethod
    def from_values(cls, values: dict[str, Any], where: str = "") -> TrainConfig:
        """A config from a dict of fields (a file, `--set` options); unknown names are refused by name."""
        from bytelift.checks import UsageError

        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"unknown training option(s) {sorted(unknown)}{' ' + where if where else ''}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_weights(self) -> LossWeights:
        return LossWeights(boundary=self.boundary_loss_weight, encoder=self.encoder_loss_weight,
                           encoder_relative=self.encoder_loss_relative,
                           dense_distill=self.dense_distill_weight)


def whitespace_token_mask(tokenizer: ByteTokenizer, size: int) -> torch.Tensor:
    """(size,) bool: source tokens whose bytes start with a space, newline or tab."""
    mask = torch.zeros(size, dtype=torch.bool)
    for i, b in enumerate(tokenizer.source_vocab.token_bytes):
        if b and b[0] in WHITESPACE_BYTES:
            mask[i] = True
    return mask


def build_objective(cfg: TrainConfig) -> tuple[nn.Module, ByteTokenizer]:
    """The model to train wrapped in its stage's objective, and the byte tokenizer."""
    if cfg.stage == 1:
        from bytelift.sources import load_source

        source, source_tokenizer = load_source(cfg.source)
        teacher_embedding = source.get_input_embeddings()  # kept: from_source drops it from the global model
        model = ByteliftForCausalLM.from_source(
            source, source_tokenizer, seed=cfg.seed, **{"source_name_or_path": cfg.source, **cfg.model}
        )
        tok = model.tokenizer
        vocab_rows = source.get_output_embeddings().weight.shape[0]
        objective = Stage1Objective(
            model,
            teacher_lm=source,
            teacher_embedding=teacher_embedding,
            whitespace_tokens=whitespace_token_mask(tok, vocab_rows),
            teacher_start_id=tok.special_to_source[BOS_ID],
            weights=cfg.loss_weights(),
        )
        return objective, tok
    if not cfg.init_from:
        raise ValueError("stage 2 starts from a stage-1 model: pass init_from (--init-from)")
    check_model_folder(cfg.init_from)
    model = ByteliftForCausalLM.from_pretrained(cfg.init_from)
    return Stage2Objective(model, weights=cfg.loss_weights()), model.tokenizer


def parameter_groups(objective: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on embeddings, norms and biases; in stage 2 the global model gets
    its own (lower) learning rate; the boundary predictor's learning rate is the local one times
    `predictor_lr_scale`. Frozen parameters are left out."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in objective.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # The source's LM head (source prior) learns at the global model's rate: both are the source's.
        if ".global_model." in f".{name}" or ".prior_head." in f".{name}":
            kind = "global"
        elif ".boundary_predictor." in f".{name}":
            kind = "predictor"
        else:
            kind = "local"
        no_decay = any(m in name for m in NO_DECAY_MARKERS) or p.dim() < 2
        groups.setdefault((kind, no_decay), []).append(p)
    lrs = {"global": cfg.global_lr, "local": cfg.lr, "predictor": cfg.lr * cfg.predictor_lr_scale}
    out = []
    for (kind, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lrs[kind],
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "name": f"{kind}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


class ByteliftTrainer(Trainer):
    """`transformers.Trainer` for a stage objective: logs every loss term, boundary metrics and bytes/s,
    saves the byte model itself (safetensors, loadable with from_pretrained) in each checkpoint, marks
    checkpoints complete only after everything is written, and evaluates held-out bits per byte."""

    def __init__(self, *args, run_config: TrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self._sums: dict[str, float] = {}
        self._count = 0
        self._bytes = 0.0
        self._tick = time.time()

    # --- loss and logging -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        for k, v in out.items():
            if k in ("loss", "bytes"):
                continue
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._count += 1
        self._bytes += float(out["bytes"])
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count and "loss" in logs:
            logs.update({k: round(v / self._count, 5) for k, v in self._sums.items()})
            now = time.time()
            logs["bytes_per_s"] = round(self._bytes * self.args.world_size / max(now - self._tick, 1e-9), 1)
            self._sums, self._count, self._bytes, self._tick = {}, 0, 0.0, now
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        budget = next((c for c in self.callback_handler.callbacks if isinstance(c, TimeBudget)), None)
        if self.lr_scheduler is None and self.run_config.max_steps is None and budget is not None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, wall_clock_schedule(budget, self.run_config.warmup_ratio)
            )
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = parameter_groups(self.model, self.run_config)
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.run_config.lr, betas=(0.9, self.run_config.adam_beta2), eps=1e-8
            )
        return self.optimizer

    # --- checkpoints --------------------------------------------------------------------------------------

    def _byte_model(self) -> ByteliftForCausalLM:
        return self.accelerator.unwrap_model(self.model).model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._byte_model().save_pretrained(output_dir)
        write_json_atomically(Path(output_dir) / RUN_CONFIG_NAME, self.run_config.to_dict())

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            write_json_atomically(folder / COMPLETE_MARKER, {"step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        check_model_folder(resume_from_checkpoint)
        target = self._byte_model()
        state = {}
        for name in os.listdir(resume_from_checkpoint):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(resume_from_checkpoint, name)))
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        model = self._byte_model()
        metrics = evaluate_heldout(
            model, self.get_eval_dataloader(dataset), teacher_forced=self.run_config.stage == 1,
            max_batches=self._eval_batches(),
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        return metrics

    def _eval_batches(self) -> int:
        """Batches holding the run's `eval_windows` held-out windows (at least one)."""
        return max(1, self.run_config.eval_windows // self.args.per_device_eval_batch_size)

    @torch.no_grad()
    def calibrate_boundaries(self) -> tuple[float, float, float]:
        """Set the model's `boundary_threshold` to the best-F1 one on the held-out windows (training windows
        when there is none; gathered from every rank, so all ranks agree). Returns (threshold, F1 before,
        F1 after)."""
        import torch.distributed as dist

        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        model = self._byte_model()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logps, golds = [], []
        for batch in itertools.islice(self.get_eval_dataloader(dataset), self._eval_batches()):
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["attention_mask"].bool()
            h, _ = model.encoder(batch["input_ids"], batch["expanded_ids"], mask=mask)
            logp = model.boundary_predictor(h, mask)
            decidable = decidable_positions(mask, model.config.boundary_lookahead)
            logps.append(logp[decidable].cpu())
            golds.append(batch["boundary_labels"].bool()[decidable].cpu())
        model.train(was_training)
        logp, gold = torch.cat(logps), torch.cat(golds)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (logp, gold))
            logp, gold = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        before = precision_recall_f1(*boundary_counts(logp > math.log(model.config.boundary_threshold), gold,
                                                      torch.ones_like(gold)))["boundary_f1"]
        threshold, after = best_f1_threshold(logp, gold)
        model.config.boundary_threshold = threshold
        return threshold, before, after

    def calibrate_decoding(self):
        """Set the model's `decode_boundary_bias` (see `calibration.calibrate_boundary_bias`) from the
        held-out windows (training windows when there is no held-out split); returns the calibration."""
        from bytelift.calibration import calibrate_boundary_bias

        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        batches = itertools.islice(self.get_eval_dataloader(dataset), self._eval_batches())
        model = self._byte_model()
        was_training = model.training
        model.eval()
        calibration = calibrate_boundary_bias(model, batches)
        model.train(was_training)
        model.config.decode_boundary_bias = calibration.bias
        return calibration


@torch.no_grad()
def evaluate_heldout(model: ByteliftForCausalLM, batches, teacher_forced: bool, max_batches: int) -> dict[str, float]:
    """Held-out bits per byte (folded 256-way byte probabilities, byte targets only) and the predictor's
    boundary precision/recall/F1 against the source tokens.

    With `teacher_forced` the global model reads the true token boundaries (stage 1), else the
    predictor's (stage 2)."""
    was_training = model.training
    model.eval()
    nll_bits, n_bytes = 0.0, 0
    counts = [0, 0, 0]  # true positives, predicted, gold
    device = next(model.parameters()).device
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        gold = batch["boundary_labels"].bool() & mask
        out = model(
            input_ids=batch["input_ids"], attention_mask=mask, expanded_ids=batch["expanded_ids"],
            boundary_mask=gold if teacher_forced else None,
        )
        logp = fold_fused_logprobs(out.logits)  # (B, L, 256)
        nxt = batch["input_ids"][:, 1:]
        is_byte = (nxt >= BYTE_OFFSET) & mask[:, 1:]
        lp = logp[:, :-1].gather(-1, (nxt - BYTE_OFFSET).clamp_min(0)[..., None])[..., 0]
        nll_bits += float(-(lp * is_byte).sum()) / math.log(2)
        n_bytes += int(is_byte.sum())
        pred = model.predict_boundaries(out.boundary_logprobs, mask, batch["input_ids"])
        decidable = decidable_positions(mask, model.config.boundary_lookahead)
        for k, c in enumerate(boundary_counts(pred, gold, decidable)):
            counts[k] += c
    model.train(was_training)
    return {"bits_per_byte": nll_bits / max(n_bytes, 1), **precision_recall_f1(*counts), "bytes": float(n_bytes)}


class MergingCollator:
    """Stage 2 with bigger patches: after collation, merge adjacent patches BPE-style until the batch
    reaches `target_ratio` bytes per patch; the boundary targets (and so the predictor) follow."""

    def __init__(self, base, target_ratio: float, seed: int = 0):
        self.base, self.target_ratio, self.seed = base, target_ratio, seed
        self.calls = 0
        self.last_ratio = float("nan")

    def __call__(self, examples):
        from bytelift.data import bpe_merge_patches, patch_boundaries, patch_ids_from_lengths

        batch = self.base(examples)
        merged = bpe_merge_patches(
            batch["patch_lengths"], batch["token_ids"], self.target_ratio, seed=[self.seed, self.calls]
        )
        self.calls += 1
        lengths = torch.as_tensor(merged.patch_lengths)
        L = batch["input_ids"].shape[1]
        batch["patch_lengths"] = lengths
        batch["patch_mask"] = lengths > 0
        batch["boundary_labels"] = patch_boundaries(lengths, L)
        batch["patch_ids"] = patch_ids_from_lengths(lengths, L)
        self.last_ratio = float(merged.ratio)
        return batch


def _datasets(cfg: TrainConfig, tokenizer: ByteTokenizer, rank: int, world_size: int):
    import datasets

    from bytelift.char_skills import CharSkillGenerator
    from bytelift.corpus_reading import corpus_options, load_corpus, read_corpus
    from bytelift.data import ByteWindowDataset

    options = corpus_options(cfg)
    if cfg.streaming:
        train_corpus, stats = load_corpus(cfg.data, split="train", streaming=True, **options)
        heldout = load_corpus(cfg.data, split="heldout", streaming=True, **options)[0] if cfg.heldout_fraction > 0 else None
    else:  # one reading, both sides
        corpus = read_corpus(cfg.data, weights=cfg.data_weights, **options)
        stats = corpus.stats
        stats.documents, stats.other_split = len(corpus.train), len(corpus.heldout)  # as seen from training
        train_corpus = datasets.Dataset.from_dict({"text": corpus.train})
        if corpus.train_index is not None:  # mixing weights: sources repeated or subsampled
            train_corpus = train_corpus.select(corpus.train_index)
        heldout = datasets.Dataset.from_dict({"text": corpus.heldout}) if corpus.heldout else None
    chars = CharSkillGenerator() if cfg.char_skill_rate > 0 else None
    common = dict(window_tokens=cfg.window_tokens, byte_expansion_factor=cfg.byte_expansion_factor)
    # Under torchrun every rank reads its own shard of the documents (batches are not dispatched from
    # rank 0: their byte lengths differ from rank to rank). Every rank evaluates the whole held-out set.
    train = ByteWindowDataset(
        train_corpus, tokenizer, seed=cfg.seed, epochs=None, char_skills=chars, char_rate=cfg.char_skill_rate,
        document_piece_bytes=cfg.document_piece_bytes, rank=rank, world_size=world_size, **common,
    )
    evals = (
        ByteWindowDataset(heldout, tokenizer, seed=cfg.seed, epochs=1, shuffle=False, **common)
        if heldout is not None else None
    )
    return train, evals, stats


def train(cfg: TrainConfig, check: bool = True) -> dict[str, Any]:
    """Run one training stage; returns the final metrics. The output folder ends up holding the trained
    byte model (loadable with `AutoModelForCausalLM.from_pretrained`), checkpoints and log.jsonl.

    With `check` (the default) the inputs are checked first (`preflight.check_training_run`): a refused run
    writes nothing. A run that fails before its first complete checkpoint removes the output folder it
    created."""
    checked = None
    if check:
        from bytelift.preflight import check_training_run

        checked = check_training_run(cfg)
    created = not os.path.exists(cfg.output)
    try:
        return _train(cfg, checked)
    except BaseException:
        if created and latest_complete_checkpoint(cfg.output) is None:
            import shutil

            shutil.rmtree(cfg.output, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise


def _train(cfg: TrainConfig, checked=None) -> dict[str, Any]:
    from transformers import set_seed

    from bytelift.data import ByteCollator

    set_seed(cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    if checked is not None and int(os.environ.get("RANK", "0")) == 0:  # the corpus as read and split, recorded
        write_json_atomically(Path(cfg.output) / "corpus.json",
                              {"data": cfg.data, "sources": [dataclasses.asdict(s) for s in checked.stats.sources]})
    objective, tokenizer = build_objective(cfg)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    train_ds, eval_ds, stats = _datasets(cfg, tokenizer, rank, world_size)
    collator = ByteCollator.from_tokenizer(tokenizer, pad_to_multiple_of=64)
    if cfg.stage == 2 and cfg.target_bytes_per_patch:
        collator = MergingCollator(collator, cfg.target_bytes_per_patch, seed=cfg.seed)

    has_tensorboard = _importable("tensorboard")
    args = TrainingArguments(
        output_dir=cfg.output,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps if cfg.max_steps is not None else UNBOUNDED_STEPS,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta2=cfg.adam_beta2,
        lr_scheduler_type="linear",
        warmup_steps=int(round(cfg.warmup_ratio * cfg.max_steps)) if cfg.max_steps is not None else 0,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps,
        report_to=["tensorboard"] if has_tensorboard else [],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        fsdp="full_shard auto_wrap" if cfg.fsdp else "",
        ddp_find_unused_parameters=False,
        accelerator_config={"dispatch_batches": False},
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=cfg.max_steps is None,  # sized by time: TimeBudget draws a bar in minutes
    )
    trainer = ByteliftTrainer(
        model=objective,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=[JsonlLogger(Path(cfg.output) / LOG_NAME)]
        + ([TimeBudget(cfg.max_minutes, progress=cfg.max_steps is None)] if cfg.max_minutes else []),
        run_config=cfg,
    )
    trainer.add_callback(ThroughputOnBar(trainer))
    if cfg.snapshot_minutes and cfg.fsdp:  # a rank holds shards only; save_pretrained needs whole weights
        print("snapshot_minutes skipped under FSDP")
    elif cfg.snapshot_minutes:
        trainer.add_callback(Snapshots(trainer, cfg.snapshot_minutes, cfg.snapshot_offset_minutes))
    if cfg.max_steps is None:  # TimeBudget's bar shows the figures; the printer would repeat every log dict
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = latest_complete_checkpoint(cfg.output) if cfg.resume else None
    if cfg.resume and resume is None:
        print(f"no complete checkpoint in {cfg.output}: starting from the beginning")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    metrics.update({f"corpus_{k}": v for k, v in stats.as_dict().items()})
    if eval_ds is not None:
        # The trainer may have just evaluated at the last step; evaluate again only if it did not.
        step = trainer.state.global_step
        done = [e for e in trainer.state.log_history if e.get("step") == step and "eval_bits_per_byte" in e]
        metrics.update({k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate())
    metrics["ranks_in_sync"] = ranks_in_sync(trainer._byte_model())
    if cfg.calibrate_boundaries and cfg.fsdp:  # the encoder and predictor are called outside FSDP's forward
        print("calibrate_boundaries skipped under FSDP")
    elif cfg.calibrate_boundaries:  # saved with the model: every later forward cuts patches at it
        threshold, before, after = trainer.calibrate_boundaries()
        metrics.update(boundary_threshold=threshold, calibration_boundary_f1_before=before,
                       calibration_boundary_f1=after)
    if cfg.calibrate_decoding and cfg.fsdp:  # decoding reads whole weights; FSDP holds shards of them
        print("calibrate_decoding skipped under FSDP: run `bytelift calibrate` on the saved model")
    elif cfg.calibrate_decoding:  # the threshold is saved with the model: generate() decodes at the trained rate
        start = time.perf_counter()
        calibration = trainer.calibrate_decoding()
        metrics.update(decode_boundary_bias=calibration.bias, decode_bytes_per_patch=1 / max(calibration.rate, 1e-9),
                       decode_bytes_per_patch_uncalibrated=1 / max(calibration.trials[0][1], 1e-9),
                       decode_calibration_seconds=round(time.perf_counter() - start, 1))
    trainer.save_model(cfg.output)  # the final model sits at the top of the output folder
    if trainer.args.should_save:
        write_json_atomically(Path(cfg.output) / "train_metrics.json", metrics)
    return metrics


@torch.no_grad()
def ranks_in_sync(model: nn.Module) -> bool:
    """True when every process holds bit-identical weights (always true for a single process)."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return len(set(everyone)) == 1


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
