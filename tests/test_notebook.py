"""The Colab notebook (colab/kdjax_cifar10_tpu.ipynb) really runs.

`test_notebook_runs_end_to_end` EXECUTES the notebook with nbclient in a Jupyter kernel on this
machine's Python (`sys.executable`), in quick mode and offline, through the notebook's
KDJAX_NOTEBOOK_* environment variables:

* KDJAX_NOTEBOOK_SOURCE: this checkout; KDJAX_NOTEBOOK_INSTALL=0: pip is not run (kdjax is already
  installed in this environment), the pip command is printed instead;
* KDJAX_NOTEBOOK_DATA: a folder holding a tiny stand-in `cifar-10-python.tar.gz` in the original
  format (so the download is skipped and kdjax's own archive reader is used);
* KDJAX_NOTEBOOK_FLAGS: tiny models and batches, so that the three stages take seconds.

TensorFlow and tensorflow-datasets are made unimportable in the kernel and in the training
subprocess, as on a Colab TPU runtime. There is no Drive outside Colab: the notebook then keeps its
files under the kernel's working directory (a temporary folder here).

The other tests are static: valid notebook, no TensorFlow install, `jax[tpu]` pinned to kdjax's
JAX version, the kernel kept off the TPU.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import pathlib
import pickle
import re
import sys
import tarfile
import tokenize

import nbformat
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "kdjax_cifar10_tpu.ipynb"
CIFAR10_CONFIG = ROOT / "experiments" / "configs" / "cifar10_resnet18_mobilenetv2.py"

# Shrinks the quick run to seconds on 2 CPU cores (the notebook's QUICK flags stay: 2 epochs each).
TEST_FLAGS = ("--config.teacher.model=cnn_tiny --config.student.model=mlp --config.batch_size=16 "
              "--config.eval_batch_size=32 --config.throughput_batch=16 --config.log.report=False")

NO_TENSORFLOW = '''
"""As on a Colab TPU runtime: TensorFlow and tensorflow-datasets are not installed."""
import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tensorflow_datasets"):
            return None  # not found, as if not installed
        return PathFinder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(PathFinder, attr)


sys.meta_path[:] = [_PathFinderWithoutTensorFlow() if f is PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def code_cells(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def base_dependencies() -> list[str]:
    """pyproject.toml's [project] dependencies (what a plain `pip install kdjax` brings)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def jax_lower_bound() -> str:
    (spec,) = [d for d in base_dependencies() if re.match(r"jax\s*>=", d)]
    return spec.split(">=")[1].split(",")[0].strip()


# ------------------------------------------------------------------------------------- static


def test_valid_nbformat_without_outputs(nb):
    assert nb.nbformat == 4
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_code_cells_parse(code_cells):
    assert code_cells
    for cell in code_cells:
        assert not re.search(r"^\s*[!%]", cell, re.M), f"IPython-only syntax in:\n{cell[:200]}"
        ast.parse(cell)


def test_settings_cell_comes_first_and_defaults_to_quick(code_cells):
    settings = code_cells[0]
    assert "SETTINGS" in settings
    assert re.search(r'^KDJAX_SOURCE = ""', settings, re.M), "the source must be set by the user"
    assert re.search(r"^QUICK = True\b", settings, re.M)


def test_no_tensorflow(code_cells):
    """Colab TPU runtimes lack TensorFlow and it conflicts with jax[tpu]: nothing may bring it."""
    for cell in code_cells:
        tokens = tokenize.generate_tokens(io.StringIO(cell).readline)
        code = " ".join(t.string for t in tokens if t.type != tokenize.COMMENT)
        assert not re.search(r"tensorflow|tfds", code, re.I), cell[:200]
    assert not [d for d in base_dependencies() if "tensorflow" in d], "`pip install kdjax` brings TensorFlow"


def test_jax_pinned_to_kdjax_requirement(code_cells):
    version = jax_lower_bound()
    text = "\n".join(code_cells)
    pins = re.findall(r"jax(?:\[[\w-]+\])?==([\w.]+)", text)
    assert f"jax[tpu]=={version}" in text
    assert pins and set(pins) == {version}, f"jax pins {pins} != kdjax's jax>={version}"
    # jax and kdjax in the same pip command (the executed test checks the printed command too)
    assert re.search(r'"pip", "install"[^\]\n]*\bJAX, REQUIREMENT\]', text)


def test_drive_quota_explained(nb):
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "checkpoint.keep=1" in text and "quota" in text and "bin" in text


def imported_modules(cell: str):
    for node in ast.walk(ast.parse(cell)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_kernel_stays_off_the_tpu(code_cells):
    """A TPU admits one process: the first kernel cell that imports jax or kdjax must pin this
    kernel's JAX to the CPU before anything from kdjax is imported, or the training subprocess
    could not get the TPU. (Imports inside subprocess command strings do not count.)"""
    for cell in code_cells:
        if any(name.split(".")[0] in ("jax", "kdjax") for name in imported_modules(cell)):
            pin = cell.find('jax.config.update("jax_platforms", "cpu")')
            first_kdjax = re.search(r"^\s*(from|import) kdjax", cell, re.M)
            assert pin > cell.find("import jax") >= 0, cell[:200]
            assert first_kdjax is None or pin < first_kdjax.start(), cell[:200]
            return
    pytest.fail("no kernel cell imports jax or kdjax")


# ----------------------------------------------------------------------------------- executed


def write_fake_cifar10(folder: pathlib.Path, per_batch: int = 16, test: int = 32) -> None:
    """A tiny cifar-10-python.tar.gz in the original layout (pickled dicts, rows of 3072 bytes)."""
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test}
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, n in batches.items():
            path = folder / name
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            path.write_bytes(pickle.dumps({b"data": data, b"labels": [int(i % 10) for i in range(n)]}))
            tar.add(path, arcname=f"cifar-10-batches-py/{name}")
            path.unlink()


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(nb, tmp_path_factory):
    """The notebook executed in quick mode, offline, on CPU; (executed notebook, facts, data dir)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    tmp = tmp_path_factory.mktemp("notebook")
    data = tmp / "data"
    data.mkdir()
    write_fake_cifar10(data)
    blocker = tmp / "no_tensorflow"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TENSORFLOW)
    # The kernel runs on this very interpreter: a kernelspec found first on JUPYTER_PATH.
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kdjax test", "language": "python"}))
    work = tmp / "work"
    work.mkdir()

    run_nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    run_nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('KERNEL_PYTHON', sys.executable)"))
    run_nb.cells.append(nbformat.v4.new_code_cell(
        "print('FACTS', json.dumps({'workdir': WORKDIR, 'full': experiment(quick=False)}))"))

    env = {
        "KDJAX_NOTEBOOK_SOURCE": str(ROOT),
        "KDJAX_NOTEBOOK_INSTALL": "0",
        "KDJAX_NOTEBOOK_DATA": str(data),
        "KDJAX_NOTEBOOK_FLAGS": TEST_FLAGS,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
        "JUPYTER_PATH": str(tmp / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "IPYTHONDIR": str(tmp / "ipython"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MPLBACKEND", raising=False)
        client = NotebookClient(run_nb, kernel_name="python3", timeout=170, startup_timeout=120,
                                resources={"metadata": {"path": str(work)}})
        try:
            client.execute()
        except CellExecutionError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"the notebook failed:\n{str(e)[-6000:]}")
    text = "\n".join(outputs_text(c) for c in run_nb.cells if c.cell_type == "code")
    facts = json.loads(re.search(r"^FACTS (.*)$", text, re.M).group(1))
    if os.environ.get("KDJAX_NOTEBOOK_TEST_DUMP"):  # to read what a user would see
        pathlib.Path(os.environ["KDJAX_NOTEBOOK_TEST_DUMP"]).write_text(text)
    return run_nb, text, facts, data, work


def test_notebook_runs_end_to_end(executed):
    run_nb, text, facts, data, work = executed
    # the kernel (and so the training subprocess) is this interpreter
    assert re.search(r"^KERNEL_PYTHON (.*)$", text, re.M).group(1) == sys.executable
    # test mode: the pip line is printed, not run; jax and kdjax are in the same command
    pip_line = re.search(r"^KDJAX_NOTEBOOK_INSTALL=0: not running (.*)$", text, re.M).group(1)
    assert f"jax=={jax_lower_bound()}" in pip_line and pip_line.endswith(f" {ROOT}")
    # the real command ran, on the CIFAR archive, with keep=1 and the quick epochs
    workdir = pathlib.Path(facts["workdir"])
    assert workdir.parent == work / "kdjax_files" / "runs"  # no Drive outside Colab
    assert f"-m experiments.cifar --config={CIFAR10_CONFIG}" in text
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"]["name"] == "cifar10" and config["dataset"]["manual_dir"] == str(data)
    assert config["dataset"]["mock_examples"] == 0
    assert config["checkpoint"]["keep"] == 1
    assert config["teacher"]["epochs"] == config["student"]["epochs"] == 2
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"teacher", "student", "student_scratch"}
    for role in summary:
        steps = [p for p in (workdir / role / "checkpoints").iterdir() if p.name.isdigit()]
        assert len(steps) == 1, f"{role}: checkpoint.keep=1 should leave one checkpoint, found {steps}"
    # the comparison table and the per-epoch plot
    assert "test acc (last)" in text and "student_scratch" in text
    images = [o for c in run_nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "no accuracy plot"
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert sorted((r["role"], r["epoch"]) for r in evals) == sorted(
        (role, e) for role in summary for e in (1.0, 2.0))
    (losses_cell,) = [c for c in run_nb.cells if "losses.kd(" in c.source]
    assert float(outputs_text(losses_cell)) == 0.0  # kd of identical logits


def test_full_mode_command(executed):
    """QUICK = False: the unchanged CIFAR-10 recipe (no epoch overrides), with keep=1 and the
    archive; every override names a real config field."""
    _, _, facts, data, _ = executed
    command, workdir = facts["full"]
    assert command[1:3] == ["-m", "experiments.cifar"]
    assert re.fullmatch(r"cifar10_full_[0-9a-f]{8}", os.path.basename(workdir))  # own folder per EXTRA_FLAGS
    flags = command[3:-1]
    assert flags[0] == f"--config={CIFAR10_CONFIG}"
    assert "--config.checkpoint.keep=1" in flags and f"--config.dataset.manual_dir={data}" in flags
    assert not [f for f in flags if ".epochs=" in f]
    assert command[-1] == f"--workdir={workdir}"
    spec = importlib.util.spec_from_file_location("notebook_cifar10_config", CIFAR10_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.teacher.epochs == config.student.epochs == 240 and not config.dataset.mock_examples
    for flag in flags[1:]:
        node = config
        for part in flag.removeprefix("--config.").split("=")[0].split("."):
            assert part in node, f"{flag}: no field {part!r} in the CIFAR-10 config"
            node = node[part]
