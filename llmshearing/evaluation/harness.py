"""`llmshearing evaluate`: EleutherAI's lm-evaluation-harness on exported Hugging Face directories, side by side.

The paper (and DarwinLM, Minitron, LLM-Pruner) report downstream accuracy from this harness, so the
numbers here are the harness's own: its `hf` model class on the exported directory (transformers'
LlamaForCausalLM, the export's tokenizer and special ids), its task definitions, its metrics. We only
run it once per model, keep the metrics, and print them next to each other with the difference.

    llmshearing evaluate MODEL_DIR [--baseline SOURCE_DIR] --tasks arc_easy,piqa [--num-fewshot N] ...
    llmshearing evaluate MODEL_DIR --local-corpus demo_out/raw   # offline: tasks built from a local corpus

The harness is the `eval` extra (in `dev`): `pip install -e ".[eval]"`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

#: The paper's evaluation (lm-eval-harness task names and shots): 0-shot unless noted.
PAPER_TASKS = {"sciq": 0, "piqa": 0, "winogrande": 0, "arc_easy": 0, "arc_challenge": 25, "hellaswag": 10,
               "logiqa": 0, "lambada_openai": 0, "wsc273": 0, "boolq": 32, "nq_open": 32, "mmlu": 5,
               "truthfulqa_mc2": 0, "gsm8k": 8}


def _task_manager(tasks: Sequence[str], include_path: Sequence[str | Path]):
    """Only the include path when it defines every task (indexing the harness's ~10k built-in task
    files takes seconds); the built-in tasks too otherwise."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] or None
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return TaskManager(include_path=paths)


def _clean(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """({metric: value}, {metric: stderr}) of one task's harness result ('acc,none' -> 'acc')."""
    vals, errs = {}, {}
    for k, v in metrics.items():
        if "," not in k or not isinstance(v, int | float):
            continue
        name, filt = k.split(",", 1)
        name = name if filt == "none" else f"{name} ({filt})"
        if name.endswith("_stderr"):
            errs[name.removesuffix("_stderr")] = float(v)
        else:
            vals[name] = float(v)
    return vals, errs


def run_harness(model_dir: str | Path, tasks: Sequence[str], include_path: Sequence[str | Path] = (),
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                device: str = "cpu", dtype: str = "float32", log_samples: bool = False,
                seed: int = 1234) -> dict[str, Any]:
    """One model through the harness: {'model', 'results': {task: {metric: value}}, 'stderr', 'n_samples',
    'n_shot'} (+ 'samples', the harness's per-sample records, with `log_samples`)."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a Hugging Face model directory (config.json); export one with "
                                "`llmshearing convert composer-to-hf` or `prune-export --hf`")
    tm = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` (or pass --include-path)")
    r = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(d), "dtype": dtype}, tasks=list(tasks),
                                num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
                                task_manager=tm, log_samples=log_samples, random_seed=seed,
                                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    out: dict[str, Any] = {"model": str(d), "results": {}, "stderr": {}, "n_samples": {},
                           "n_shot": dict(r.get("n-shot") or {})}
    for task, metrics in r["results"].items():
        out["results"][task], out["stderr"][task] = _clean(metrics)
        n = (r.get("n-samples") or {}).get(task) or {}
        out["n_samples"][task] = n.get("effective", n.get("original"))
    if log_samples:
        out["samples"] = r["samples"]
    return out


def compare(models: dict[str, str | Path], tasks: Sequence[str], **kw: Any) -> dict[str, Any]:
    """Every model on the same tasks with the same settings: {'tasks', 'models': {name: run_harness(...)}}."""
    return {"tasks": list(tasks), "models": {name: run_harness(d, tasks, **kw) for name, d in models.items()}}


def format_table(cmp: dict[str, Any]) -> str:
    """task / metric rows, one column per model, and the first minus the second when there are two."""
    names = list(cmp["models"])
    runs = [cmp["models"][n]["results"] for n in names]
    rows = sorted({(t, m) for res in runs for t, ms in res.items() for m in ms})
    head = f"{'task':<22} {'metric':<18} " + " ".join(f"{n[:12]:>12}" for n in names)
    if len(names) == 2:
        head += f" {'delta':>10}"
    lines = [head, "-" * len(head)]
    for t, m in rows:
        vals = [res.get(t, {}).get(m, math.nan) for res in runs]
        line = f"{t:<22} {m:<18} " + " ".join(f"{v:12.4f}" for v in vals)
        if len(names) == 2:
            line += f" {vals[0] - vals[1]:+10.4f}"
        lines.append(line)
    return "\n".join(lines)


def _run(a: argparse.Namespace) -> int:
    from llmshearing.evaluation.local_tasks import write_local_tasks
    from llmshearing.logs import setup_logging

    setup_logging()
    tasks = [t for t in (a.tasks or "").split(",") if t]
    include = list(a.include_path or [])
    tmp = None
    if a.local_corpus:
        tmp = tempfile.TemporaryDirectory(prefix="llmshearing-tasks-")
        raw = Path(a.local_corpus)
        domains = sorted(p.name for p in raw.iterdir() if (p / "docs.jsonl").is_file()) if raw.is_dir() else []
        if not domains:
            raise FileNotFoundError(f"{raw}: no <domain>/docs.jsonl folders (a raw corpus, e.g. demo_out/raw)")
        tasks += write_local_tasks(raw, tmp.name, domains)
        include.append(tmp.name)
    if not tasks:
        raise ValueError("no tasks: pass --tasks (e.g. " + ",".join(list(PAPER_TASKS)[:4]) + ") or --local-corpus")
    models = {"model": a.model_dir}
    if a.baseline:
        models["baseline"] = a.baseline
    try:
        limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
        cmp = compare(models, tasks, include_path=include, num_fewshot=a.num_fewshot, limit=limit,
                      batch_size=a.batch_size, device=a.device, dtype=a.dtype)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(cmp))
    if a.out:
        Path(a.out).write_text(json.dumps(cmp, indent=2, default=str) + "\n")
        print(f"wrote {a.out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="lm-evaluation-harness on exported models, side by side (JSON + table)",
        description="Run EleutherAI's lm-evaluation-harness on a Hugging Face model directory (and a baseline, "
                    "e.g. the source model) with the same settings; print a table and write JSON. Paper tasks: "
                    + ", ".join(f"{t} ({k}-shot)" for t, k in PAPER_TASKS.items()) + ".")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (our export)")
    p.add_argument("--baseline", metavar="DIR", default=None, help="a second HF directory, e.g. the source model")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", metavar="DIR", help="folder of extra task YAMLs")
    p.add_argument("--local-corpus", metavar="RAW_DIR", default=None,
                   help="also run the offline tasks built from RAW_DIR/<domain>/docs.jsonl (llmshearing_mc, "
                        "llmshearing_ppl), e.g. demo_out/raw")
    p.add_argument("--num-fewshot", type=int, default=None, help="override every task's shots")
    p.add_argument("--limit", type=float, default=None, help="at most this many (or this fraction of) samples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    p.add_argument("--out", metavar="JSON", default=None, help="write all results here")
    p.set_defaults(func=_run)
