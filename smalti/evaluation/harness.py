"""Benchmark tasks through EleutherAI's lm-evaluation-harness (``lm-eval``), on local task folders, for a Smalti model.

Why lm-eval rather than Smalti's own scorer: evaluators already define and trust its tasks, and a number an
evaluator signs should mean what it means everywhere else. Smalti adds two things around it:

- **Task folders are read as untrusted input and stay local.** Each ``*.yaml`` is parsed with ``safe_load`` (a
  ``!function`` tag, which would run code from the folder, is refused); its data must be local files
  (``dataset_path`` ``json``, ``csv``, ``parquet`` or ``text``, with ``dataset_kwargs.data_files`` relative to
  the YAML), so nothing is downloaded. Each definition and data file is hashed: the attestation names exactly
  what was run.
- **The model is scored as lm-eval scores any model** (``SmaltiLM``, an ``lm_eval.api.model.LM``): the
  log-likelihood of each continuation given its context, truncated on the left to the model's context length.
  Per-class adapters stay off: the shared model is what is measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from smalti.errors import SmaltiError

BUNDLED_TASKS = Path(__file__).parent / "tasks" / "shakespeare"
LOCAL_LOADERS = ("json", "csv", "parquet", "text")


class EvaluationError(SmaltiError):
    """A task folder, a task or a model that cannot be evaluated as asked."""


@dataclass
class TaskDefinition:
    name: str
    definition: Path
    definition_sha256: str
    data: dict[str, str] = field(default_factory=dict)  # data file name -> sha256
    resolved: dict[str, Any] = field(default_factory=dict)  # the YAML with data files made absolute


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_task_folder(folder: Path) -> list[TaskDefinition]:
    """Every task defined by a ``*.yaml`` in ``folder``, checked and hashed (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"--tasks {folder}: not a folder")
    tasks = []
    for path in sorted(folder.glob("*.yaml")):
        tasks.append(_read_task(path))
    if not tasks:
        raise EvaluationError(f"--tasks {folder}: no task definitions (*.yaml) in it")
    return tasks


def _read_task(path: Path) -> TaskDefinition:
    raw = path.read_bytes()
    try:
        spec = yaml.safe_load(raw.decode("utf-8"))
    except yaml.constructor.ConstructorError:
        raise EvaluationError(
            f"{path}: a tag such as !function would run code from the task folder; not allowed"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise EvaluationError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str) or not spec["task"]:
        raise EvaluationError(f"{path}: a task definition is a mapping with a 'task' name")
    if "include" in spec or "group" in spec:
        raise EvaluationError(f"{path}: 'include' and 'group' are not supported; give each task its own file")
    loader = spec.get("dataset_path")
    if loader not in LOCAL_LOADERS:
        raise EvaluationError(
            f"{path}: dataset_path {loader!r} would load from the Hugging Face Hub; use a local loader "
            f"({', '.join(LOCAL_LOADERS)}) with dataset_kwargs.data_files"
        )
    kwargs = spec.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if not isinstance(files, dict) or not files:
        raise EvaluationError(f"{path}: dataset_kwargs.data_files must map each split to local files")
    data: dict[str, str] = {}
    resolved_files: dict[str, Any] = {}
    for split, names in files.items():
        listed = names if isinstance(names, list) else [names]
        if not all(isinstance(n, str) for n in listed):
            raise EvaluationError(f"{path}: data_files.{split} must be file names")
        located = []
        for name in listed:
            file = (path.parent / name).resolve()
            if path.parent.resolve() not in file.parents:
                raise EvaluationError(f"{path}: data file {name!r} is outside the task folder")
            if not file.is_file():
                raise EvaluationError(f"{path}: data file {name!r} not found")
            data[name] = _sha256(file)
            located.append(str(file))
        resolved_files[split] = located
    resolved = {**spec, "dataset_kwargs": {**kwargs, "data_files": resolved_files}}
    return TaskDefinition(spec["task"], path, hashlib.sha256(raw).hexdigest(), data, resolved)


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def run_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: list[TaskDefinition], limit: int | None = None
) -> dict[str, dict[str, Any]]:
    """Each task's metrics (``acc``, ``acc_stderr``, ...) and how many items were scored, from lm-eval."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvaluationError(
            f"two task definitions share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}"
        )
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvaluationError("benchmark tasks need lm-evaluation-harness: pip install 'smalti[eval]'") from None
    import logging

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its notes on defaults it applied, not the user's concern
    with tempfile.TemporaryDirectory(prefix="smalti-tasks-") as folder:
        for task in tasks:
            (Path(folder) / f"{task.name}.yaml").write_text(yaml.safe_dump(task.resolved), encoding="utf-8")
        manager = TaskManager(include_path=folder, include_defaults=False)
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars (tqdm read its settings long ago)
            output = lm_eval.simple_evaluate(
                model=SmaltiLM(model, tokenizer),
                tasks=names,
                task_manager=manager,
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
            )
    if output is None:
        raise EvaluationError("lm-eval returned no results")
    results = {}
    for name in names:
        metrics = output["results"].get(name, {})
        results[name] = {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        results[name]["items"] = int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
    return results


def _lm_base() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise EvaluationError("benchmark tasks need lm-evaluation-harness: pip install 'smalti[eval]'") from None
    return LM


class _SmaltiLMFactory:
    """Built on first use, so importing this module never imports lm-eval."""

    cls: type | None = None

    def __call__(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        if self.cls is None:
            self.cls = type("SmaltiLM", (_Scoring, _lm_base()), {})  # ours first: LM declares them abstract
        return self.cls(model, tokenizer)


class _Scoring:
    """lm-eval's three request types, for a Smalti language model (ids -> logits)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(getattr(model, "context_length"))

    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, where="a task item"))
        except ValueError as error:
            raise EvaluationError(f"{error} (the model's tokenizer cannot read this task)") from None

    @torch.no_grad()
    def _logprob(self, ids: list[int], start: int) -> tuple[float, bool]:
        """Sum of log p(ids[i] | up to ``context_length`` tokens before it) for i >= ``start``, and whether greedy
        decoding gives every one of them: window by window, so a text longer than the context is scored too."""
        from smalti.models.adapters import set_row_classes

        total, greedy, position, window = 0.0, True, start, self.context_length
        while position < len(ids):
            end = min(position + window, len(ids))
            inputs = ids[max(0, end - 1 - window) : end - 1]
            set_row_classes(self.model, None)  # every class's adapter off: the shared model
            logits = self.model(torch.tensor(inputs)[None, :])[0, -(end - position) :].float()
            target = torch.tensor(ids[position:end])
            total += float(F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
            greedy = greedy and bool((logits.argmax(-1) == target).all())
            position = end
        return total, greedy

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """Log-likelihood of ``continuation`` after ``context``, and whether greedy decoding would produce it."""
        head, tail = self._encode(context), self._encode(continuation)
        if not head or not tail:
            raise EvaluationError("a task item with an empty context or continuation cannot be scored")
        return self._logprob(head + tail, len(head))

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.score(*request.args) for request in requests]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood from its second token on (the first has no context to be predicted from)."""
        return [self._logprob(self._encode(request.args[0]), 1)[0] for request in requests]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise EvaluationError("generation tasks (output_type generate_until) are not supported by smalti evaluate yet")


SmaltiLM = _SmaltiLMFactory()
