"""``cdq eval --tasks``: zero-shot accuracy through lm-evaluation-harness, checked against an
independent multiple-choice computation on the real stories260K (full precision and quantized), and
its one-line errors. lm-eval is in requirements/lock.txt (the ``zeroshot`` extra), which ``make
setup`` installs, so these tests run in CI; they skip only where lm-eval is not installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import cli

from cdq_cli.cli import main
from cdq_cli.models import load_causal_lm
from cdq_cli.store.reopen import load_quantized

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the zeroshot extra) is not installed")

TASK = Path(__file__).resolve().parent / "tasks" / "stories_mc.yaml"
DOCS = [json.loads(line) for line in TASK.with_suffix(".jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stories(data_dir: Path) -> Path:
    folder = data_dir / "models" / "stories260K"
    if not folder.is_dir():
        pytest.skip(f"missing shared model {folder}")
    return folder


@pytest.fixture(scope="module")
def quantized(stories: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K at 2 bits (RTN): far enough from full precision that its choices change."""
    out = tmp_path_factory.mktemp("zs") / "q"
    code = main(
        ["quantize", str(stories), "--method", "rtn", "--bits", "2", "--calib",
         str(data_dir / "text" / "c4-sample.jsonl"), "--nsamples", "4", "--seqlen", "32", "--quiet",
         "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    return out


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context), written here from the definition (not lm-eval's code): the
    tokens of context + continuation past those of the context alone, scored by one forward pass."""
    scores = []
    context_ids = tokenizer.encode(context)
    for choice in choices:
        whole = tokenizer.encode(context + " " + choice)
        assert whole[: len(context_ids)] == context_ids
        continuation = whole[len(context_ids) :]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        positions = range(len(context_ids) - 1, len(whole) - 1)  # position t predicts token t + 1
        scores.append(sum(float(logprobs[t, tok]) for t, tok in zip(positions, continuation, strict=True)))
    return scores


def expected(model, tokenizer, docs: list[dict]) -> tuple[list[float], list[float], list[list[float]]]:
    """Per-document acc (argmax of log-likelihood) and acc_norm (argmax per character)."""
    acc, norm, lls = [], [], []
    for doc in docs:
        ll = choice_loglikelihoods(model, tokenizer, doc["context"], doc["choices"])
        per_char = [v / len(c) for v, c in zip(ll, doc["choices"], strict=True)]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == doc["answer"]))
        norm.append(float(max(range(len(ll)), key=per_char.__getitem__) == doc["answer"]))
        lls.append(ll)
    return acc, norm, lls


def stderr_of_mean(values: list[float]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation (n - 1) over sqrt(n); for
    0/1 values with mean p that is sqrt(p (1 - p) / (n - 1))."""
    n, p = len(values), sum(values) / len(values)
    return math.sqrt(p * (1 - p) / (n - 1))


def run_json(capsys, target: Path, *extra: object) -> dict:
    code, out, err = cli(capsys, "eval", target, "--tasks", TASK, "--json", *extra)
    assert code == 0, err
    assert err == ""  # no lm-eval logging or progress bars on stderr
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_accuracy_matches_an_independent_computation_fp_and_quantized(stories, quantized, capsys) -> None:
    fp_model, fp_tok = load_causal_lm(str(stories))
    q_model, q_tok = load_quantized(quantized)
    fp_acc, fp_norm, fp_lls = expected(fp_model, fp_tok, DOCS)
    q_acc, q_norm, q_lls = expected(q_model, q_tok, DOCS)
    assert fp_lls != q_lls  # the quantized weights are really different ...
    assert (fp_acc, fp_norm) != (q_acc, q_norm)  # ... and so are their answers on this task

    for target, acc, norm in ((stories, fp_acc, fp_norm), (quantized, q_acc, q_norm)):
        payload = run_json(capsys, target)
        assert payload["target"] == str(target)
        [task] = payload["tasks"]
        assert task["task"] == "stories_mc" and task["samples"] == len(DOCS)
        metrics = task["metrics"]
        assert set(metrics) == {"acc", "acc_norm"}
        for name, values in (("acc", acc), ("acc_norm", norm)):
            assert metrics[name]["value"] == pytest.approx(sum(values) / len(values), abs=1e-12), name
            assert metrics[name]["stderr"] == pytest.approx(stderr_of_mean(values), abs=1e-12), name
        assert "lm-evaluation-harness" in payload["protocol"] and "zero-shot" in payload["protocol"]


def test_zero_shot_of_an_export_equals_the_folder(quantized, tmp_path, capsys) -> None:
    """`cdq eval EXPORT --tasks`: the compressed-tensors export of the 2-bit folder, its layers
    decoded by cdq, scores exactly what the folder scores (float32 scales: the same weights)."""
    from cdq_cli.store.compressed import export_compressed

    export_compressed(quantized, tmp_path / "ct")
    native, exported = run_json(capsys, quantized), run_json(capsys, tmp_path / "ct")
    assert exported["tasks"] == native["tasks"]
    assert exported["model"] == "the quantized layers decoded from the checkpoint, held whole in memory"


def test_limit_scores_the_first_items_and_the_human_output(stories, capsys) -> None:
    model, tokenizer = load_causal_lm(str(stories))
    acc, _norm, _lls = expected(model, tokenizer, DOCS[:4])
    payload = run_json(capsys, stories, "--limit", 4)
    [task] = payload["tasks"]
    assert task["samples"] == 4 and payload["limit"] == 4
    assert task["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / 4, abs=1e-12)

    code, out, err = cli(capsys, "eval", stories, "--tasks", TASK, "--limit", 4)
    assert code == 0 and err == "", err
    first, second = out.strip().splitlines()
    value, stderr = task["metrics"]["acc"]["value"], task["metrics"]["acc"]["stderr"]
    assert first.startswith(f"{stories} on stories_mc: acc {value:.4f} ± {stderr:.4f}, acc_norm ")
    assert first.endswith("(4 items)") and "lm-evaluation-harness" in second


def test_a_folder_of_task_yamls_and_relative_data_files(stories, tmp_path, capsys) -> None:
    """A task YAML and its data copied elsewhere: data_files resolve from the YAML's folder, not
    from the working directory."""
    folder = tmp_path / "my tasks"
    folder.mkdir()
    (folder / "stories_mc.yaml").write_text(TASK.read_text())
    (folder / "stories_mc.jsonl").write_text(TASK.with_suffix(".jsonl").read_text())
    (folder / "notes.yaml").write_text("just: a config, not a task\n")
    code, out, err = cli(capsys, "eval", stories, "--tasks", folder, "--limit", 2, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert [t["task"] for t in payload["tasks"]] == ["stories_mc"]
    assert payload["task_sources"] == [str(folder / "stories_mc.yaml")]


@pytest.mark.parametrize(
    ("tasks", "extra", "message"),
    [
        ("", [], "--tasks is empty"),
        (" , ", [], "--tasks is empty"),
        ("missing/task.yaml", [], "--tasks missing/task.yaml: no such task file or folder"),
        ("hellaswag", [], "lm-eval task 'hellaswag' reads its data from the Hugging Face hub"),
        (str(TASK), ["--data", "wikitext2"], "cdq eval takes --data SOURCE (perplexity, top-1) or --tasks"),
        (str(TASK), ["--seqlen", "64"], "--seqlen and --max-windows are perplexity options"),
        (str(TASK), ["--limit", "0"], "--limit is a positive number"),
    ],
)
def test_bad_task_lists_are_one_line_exit_2(tasks, extra, message, stories, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(capsys, "eval", stories, "--tasks", tasks, *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if tasks == "hellaswag":  # says what to do instead
        assert "offline" in err and "--tasks PATH.yaml" in err and "data_files" in err


def test_named_task_offline_is_refused_before_the_model_loads(monkeypatch, capsys) -> None:
    """The task list is checked first: even a target that does not exist gets the task's error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = cli(capsys, "eval", "/no/such/model", "--tasks", "arc_easy")
    assert code == 2 and "'arc_easy'" in err and "--tasks PATH.yaml" in err


def test_missing_data_file_of_a_task_is_one_line(stories, tmp_path, capsys) -> None:
    task = tmp_path / "broken.yaml"
    task.write_text(TASK.read_text().replace("stories_mc.jsonl", "gone.jsonl"))
    code, out, err = cli(capsys, "eval", stories, "--tasks", task)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "data file gone.jsonl not found" in err


def test_lm_eval_missing_says_how_to_install(stories, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails, find_spec says None
    code, out, err = cli(capsys, "eval", stories, "--tasks", TASK)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pip install 'cdq[zeroshot]'" in err


def test_vision_model_with_tasks_is_refused(capsys) -> None:
    code, out, err = cli(capsys, "eval", "timm/resnet18", "--tasks", TASK)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--tasks (lm-eval zero-shot accuracy) is for causal LMs" in err


def test_eval_needs_data_or_tasks(stories, capsys) -> None:
    code, out, err = cli(capsys, "eval", stories)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "cdq eval takes --data SOURCE (perplexity, top-1) or --tasks LIST (zero-shot accuracy)" in err


def test_a_nan_metric_is_an_error_not_a_result(monkeypatch):
    """A broken model's NaN accuracy is refused, never printed (stderr 'N/A' is only absent)."""
    import lm_eval.evaluator
    import lm_eval.models.huggingface

    from cdq_cli.evaluate import zeroshot

    results = {"results": {"t": {"acc,none": float("nan"), "acc_stderr,none": "N/A"}}}
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: None)
    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", lambda **kwargs: results)
    with pytest.raises(ValueError, match="task t: acc is nan"):
        zeroshot.evaluate_tasks(torch.nn.Linear(2, 2), None, {"t": object()}, device=torch.device("cpu"))
    results["results"]["t"]["acc,none"] = 0.5
    out = zeroshot.evaluate_tasks(torch.nn.Linear(2, 2), None, {"t": object()}, device=torch.device("cpu"))
    assert out["tasks"][0]["metrics"]["acc"] == {"value": 0.5, "stderr": None}


# -- code that comes with a task runs only with --trust-task-code --------------------------------------

HELPER = """import pathlib
pathlib.Path({marker!r}).write_text("ran")


def process(docs):
    return docs
"""


PLAIN = {  # tests/tasks/stories_mc.yaml, one flow-style line per key
    "task": "stories_mc",
    "dataset_path": "json",
    "dataset_kwargs": "{data_files: {test: stories_mc.jsonl}}",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": '"{{context}}"',
    "doc_to_choice": '"{{choices}}"',
    "doc_to_target": '"{{answer}}"',
    "metric_list": "[{metric: acc, aggregation: mean, higher_is_better: true}]",
}


def task_folder(root: Path, marker: Path, **keys: str) -> Path:
    """The stories task in ``root`` (``keys`` replace or add YAML lines, written as they are) with
    its data and ``helpers.py``, a module that leaves ``marker`` behind when it is imported."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stories_mc.jsonl").write_text(TASK.with_suffix(".jsonl").read_text())
    (root / "helpers.py").write_text(HELPER.format(marker=str(marker)))
    (root / "task.yaml").write_text("".join(f"{key}: {value}\n" for key, value in (PLAIN | keys).items()))
    return root / "task.yaml"


@pytest.mark.parametrize("route", ["tag", "include"])
def test_a_function_tag_runs_code_only_with_trust_task_code(route, stories, tmp_path, capsys) -> None:
    """`process_docs: !function helpers.process` (in the task, or in a file it includes) imports
    helpers.py; without --trust-task-code the task is refused and the module never runs."""
    marker = tmp_path / "helper-ran"
    if route == "tag":
        task = task_folder(tmp_path / "t", marker, process_docs="!function helpers.process")
    else:
        task = task_folder(tmp_path / "t", marker, include="base.yaml")
        (task.parent / "base.yaml").write_text("process_docs: !function helpers.process\n")
    code, out, err = cli(capsys, "eval", stories, "--tasks", task, "--limit", 2)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "'process_docs: !function helpers.process'" in err and "--trust-task-code" in err
    assert ("which it includes" in err) == (route == "include")
    assert not marker.exists()
    code, out, err = cli(
        capsys, "eval", stories, "--tasks", task, "--limit", 2, "--trust-task-code", "--json"
    )
    assert code == 0, err
    assert marker.read_text() == "ran"  # asked for: lm-eval imported and ran the helper
    assert json.loads(out)["tasks"][0]["samples"] == 2


def test_yamls_that_are_not_tasks_are_never_loaded_as_code(stories, tmp_path, capsys) -> None:
    """A folder given to --tasks whose sub-folder holds a YAML that is not a task but names a
    module (`!function evil.process`): only the real task is scored and the module never runs,
    with or without --trust-task-code (no task named it)."""
    marker = tmp_path / "evil-ran"
    folder = task_folder(tmp_path / "tasks", tmp_path / "unused").parent
    (folder / "sub").mkdir()
    (folder / "sub" / "evil.py").write_text(HELPER.format(marker=str(marker)))
    (folder / "sub" / "settings.yaml").write_text("process_docs: !function evil.process\n")
    for extra in ([], ["--trust-task-code"]):
        code, out, err = cli(capsys, "eval", stories, "--tasks", folder, "--limit", 2, "--json", *extra)
        assert code == 0, err
        assert [t["task"] for t in json.loads(out)["tasks"]] == ["stories_mc"]
        assert not marker.exists()


def test_a_template_cannot_reach_python_unless_trusted(stories, tmp_path, capsys) -> None:
    """lm-eval renders prompts with an unsandboxed Jinja environment, where a template can call
    os functions through `cycler.__init__.__globals__`; cdq renders them in Jinja's sandbox."""
    marker = tmp_path / "template-ran"
    reach = f"{{{{ cycler.__init__.__globals__.os.makedirs('{marker}', exist_ok=True) }}}}"
    task = task_folder(tmp_path / "t", tmp_path / "unused", doc_to_text=f'"{reach}{{{{context}}}}"')
    code, out, err = cli(capsys, "eval", stories, "--tasks", task, "--limit", 2)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "template" in err and "unsafe" in err and "--trust-task-code" in err
    assert not marker.exists()
    code, _, err = cli(capsys, "eval", stories, "--tasks", task, "--limit", 2, "--trust-task-code")
    assert code == 0, err
    assert marker.is_dir()  # asked for: lm-eval's own environment ran it


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("metric_list", "[{{metric: '{script}'}}]", "is not one of lm-eval's own metrics"),
        ("metric_list", "[{{metric: acc, hf_evaluate: true}}]", "is not one of lm-eval's own metrics"),
        (
            "dataset_kwargs",
            "{{data_files: {{test: stories_mc.jsonl}}, trust_remote_code: true}}",
            "trust_remote_code",
        ),
    ],
)
def test_other_ways_a_task_runs_code_are_refused(key, value, message, stories, tmp_path, capsys) -> None:
    """A metric lm-eval does not have is loaded by HF evaluate, which imports the metric's script
    (here a local one that would leave a marker); a dataset may be allowed to run its script."""
    marker = tmp_path / "metric-ran"
    script = tmp_path / "evil_metric.py"
    script.write_text(HELPER.format(marker=str(marker)))
    task = task_folder(tmp_path / "t", tmp_path / "unused", **{key: value.format(script=script)})
    code, out, err = cli(capsys, "eval", stories, "--tasks", task, "--limit", 2)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert message in err and "--trust-task-code" in err
    assert not marker.exists()


def test_trust_task_code_without_tasks_is_refused(stories, wikitext, capsys) -> None:
    code, out, err = cli(capsys, "eval", stories, "--data", wikitext, "--trust-task-code")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--trust-task-code is for --tasks" in err
