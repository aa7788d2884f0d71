"""lmms-eval 0.7.3's own task code, as the reference our evaluation is compared with.

The lmms-eval wheel cannot be a test dependency (its requirements pull a CUDA torch and dozens
of packages), so `lmms_eval_root()` fetches the wheel alone (`pip download --no-deps`, cached
in $IADA_JAX_CACHE or ~/.cache/iada_jax; $IADA_LMMS_EVAL_WHEEL names a local copy instead) and
unpacks it with the package `__init__`s of `lmms_eval`, `lmms_eval.tasks` and
`lmms_eval.filters` emptied: those import the whole harness (models, evaluate, sacrebleu...),
while each task's `utils.py` needs only its own helpers, loguru and Levenshtein (test extras).
`lmms_eval.llm_judge` (an HTTP client for GPT judges, needing aiohttp) is replaced by a stub
whose server cannot be called: MathVista's GPT extraction is exercised through a patched
`get_chat_response` instead. Nothing else of lmms-eval is changed.
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import subprocess
import sys
import types
import zipfile

import yaml

VERSION = "0.7.3"
EMPTIED = ("lmms_eval/__init__.py", "lmms_eval/tasks/__init__.py", "lmms_eval/filters/__init__.py")


class Unavailable(Exception):
    """The lmms-eval wheel could not be obtained (the reason is the message)."""


def _cache() -> str:
    base = os.environ.get("IADA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "iada_jax")
    return os.path.join(base, f"lmms_eval-{VERSION}")


def lmms_eval_root() -> str:
    """A folder holding the unpacked `lmms_eval` package (fetched once)."""
    root = _cache()
    if os.path.isfile(os.path.join(root, "lmms_eval", "tasks", "mmmu", "utils.py")):
        return root
    wheel = os.environ.get("IADA_LMMS_EVAL_WHEEL")
    if not wheel:
        download = root + ".download"
        os.makedirs(download, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download,
                                   f"lmms-eval=={VERSION}"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f"pip download lmms-eval=={VERSION} failed: {e}") from None
        found = glob.glob(os.path.join(download, f"lmms_eval-{VERSION}-*.whl"))
        if proc.returncode != 0 or not found:
            raise Unavailable(f"pip download lmms-eval=={VERSION} failed: {proc.stderr.strip()[-500:]}")
        wheel = found[0]
    partial = root + ".partial"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(partial, [n for n in z.namelist() if n.startswith("lmms_eval/")])
    for name in EMPTIED:
        with open(os.path.join(partial, name), "w") as f:
            f.write("# emptied by tests/lmms_reference.py: the task utilities need none of the harness\n")
    if os.path.isdir(root):
        import shutil

        shutil.rmtree(root)
    os.rename(partial, root)
    return root


def _stub_llm_judge() -> None:
    stub = types.ModuleType("lmms_eval.llm_judge")

    class _Config:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class _Server:
        def evaluate(self, request):
            raise RuntimeError("no GPT server in the tests")

    stub.Request = stub.ServerConfig = _Config
    stub.get_server = lambda **kwargs: _Server()
    sys.modules["lmms_eval.llm_judge"] = stub


def task_utils(task: str):
    """`lmms_eval.tasks.<task>.utils`, imported from the unpacked wheel."""
    root = lmms_eval_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    _stub_llm_judge()
    return importlib.import_module(f"lmms_eval.tasks.{task}.utils")


def task_kwargs(yaml_path: str) -> dict:
    """The `lmms_eval_specific_kwargs` of a task yaml (its `!function` lines dropped, as
    lmms-eval's utils modules read their yaml)."""
    with open(os.path.join(lmms_eval_root(), "lmms_eval", "tasks", yaml_path)) as f:
        text = "".join(line for line in f if "!function" not in line)
    return yaml.safe_load(text).get("lmms_eval_specific_kwargs", {})


def function(relative_path: str, name: str, **globals_):
    """One top-level function of an lmms-eval source file, compiled on its own (for files whose
    imports pull in the harness, e.g. api/metrics.py's `exact_match_hf_evaluate`)."""
    path = os.path.join(lmms_eval_root(), relative_path)
    tree = ast.parse(open(path).read(), path)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = dict(globals_)
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]
