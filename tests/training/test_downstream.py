"""``evaluation.downstream``: lm-evaluation-harness on the weights while the run trains, offline,
with a small multiple-choice task defined here from local files (a task YAML reading a local
JSON file). The scores appear in metrics.jsonl and TensorBoard at the evaluated steps
(superposition-phase steps skipped), and the final step's accuracy equals an independent computation with
transformers on the final checkpoint's export (the log-likelihood of each choice after the
question, as lm-evaluation-harness defines ``acc``)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from tests.conftest import read_metrics, run_cli

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

WORDS = "the dog ran far away and then it slept under an old tree near river bank".split()


def write_task(root, n: int = 12) -> list[dict]:
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        choices = [" ".join(rng.choices(WORDS, k=3)) for _ in range(3)]
        docs.append({"question": " ".join(rng.choices(WORDS, k=6)), "choices": choices,
                     "answer": rng.randrange(3)})
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return docs


def reference_accuracy(hf_dir, docs) -> float:
    """acc by its definition: the choice whose tokens, after the question and a space, have
    the highest summed log-probability."""
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    right = 0
    for doc in docs:
        context = tok.encode(doc["question"], add_special_tokens=False)
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context),
                                                                            len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


@pytest.mark.oldest_line
def test_scores_are_logged_at_the_evaluated_steps(tiny_recipe, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = write_task(tasks)
    run_dir = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run_dir}", "training.train_steps=6",
             "training.eval_interval=0", "tst.bag_size=2", "tst.superposition_steps=2",
             "evaluation.downstream.interval=2", "evaluation.downstream.tasks=[tiny_mc]",
             f"evaluation.downstream.include_path={tasks}", "evaluation.downstream.limit=12",
             "evaluation.downstream.batch_size=4", "logging.tensorboard=true"], timeout=1200)
    # logged as they finish (the two evaluations run side by side: either may end first)
    scores = sorted(read_metrics(run_dir, "downstream"), key=lambda r: r["step"])
    # step 2 is in the superposition phase: skipped; 4 and 6 (the last) evaluated
    assert [r["step"] for r in scores] == [4, 6], scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    logged = sorted((e.step, e.value) for e in board.Scalars("downstream/tiny_mc/acc"))
    assert logged == [(r["step"], pytest.approx(r["tiny_mc/acc"])) for r in scores]
    assert all(0 <= r["tiny_mc/acc"] <= 1 for r in scores)
    assert not list((run_dir / "downstream").glob("step_*/hf"))  # exports removed after use
    run_cli(["export", str(run_dir / "checkpoints"), str(tmp_path / "hf")])
    assert scores[-1]["tiny_mc/acc"] == pytest.approx(reference_accuracy(tmp_path / "hf", docs))


def test_unknown_tasks_and_a_missing_harness_are_refused_before_the_run(tiny_recipe, tmp_path):
    result = run_cli(["train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}",
                      "evaluation.downstream.interval=2",
                      "evaluation.downstream.tasks=[no_such_task]"], check=False)
    assert result.returncode == 2
    assert "evaluation.downstream.tasks" in result.stderr and "no_such_task" in result.stderr
    assert not (tmp_path / "run").exists()
