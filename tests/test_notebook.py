"""The Colab notebook (colab/kdjax_cifar10_tpu.ipynb) stays in step with the code it drives.

Static checks only (nothing is executed): the notebook is valid nbformat v4 without outputs, its
code cells parse as Python once IPython lines (`!shell`, `%magic`) are dropped, every
`python -m experiments.X --config=FILE[:ARG] --config.a.b=V` command names a real module, config
file, config argument and config fields, every `kdjax` attribute it uses exists, and its install
cell brings TensorFlow (Colab TPU runtimes have none, and tensorflow-datasets needs it).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "kdjax_cifar10_tpu.ipynb"

COMMAND = re.compile(r"python -m (experiments\.[\w.]+)(.*)")
CONFIG_FILE = re.compile(r"--config=(\S+)")
OVERRIDE = re.compile(r"--config\.([\w.]+)=(\S+)")


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def code_cells(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def python_source(cell: str) -> str:
    """The cell without its IPython-only lines (shell escapes and magics)."""
    return "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("!", "%")))


def commands(code_cells) -> list[tuple[str, str]]:
    """(module, rest of the line) for every `python -m experiments.X ...` in the code cells."""
    return [m.groups() for cell in code_cells for m in COMMAND.finditer(cell)]


def load_config(spec: str):
    """get_config(arg) of a '--config=path[:arg]' value, as absl's config_flags would call it."""
    path, _, arg = spec.partition(":")
    assert (ROOT / path).is_file(), f"config file {path} does not exist"
    module_spec = importlib.util.spec_from_file_location("notebook_config", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def test_valid_nbformat_without_outputs(nb):
    assert nb.nbformat == 4
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_code_cells_parse(code_cells):
    assert code_cells
    for cell in code_cells:
        try:
            ast.parse(python_source(cell))
        except SyntaxError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"code cell does not parse ({e}):\n{cell}")


def test_experiment_commands(code_cells):
    cmds = commands(code_cells)
    assert cmds, "the notebook runs no experiment"
    for module, rest in cmds:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"
        spec = CONFIG_FILE.search(rest)
        assert spec, f"{module} run without --config"
        config = load_config(spec.group(1))
        for field, _ in OVERRIDE.findall(rest):
            node = config
            for part in field.split("."):
                assert part in node, f"--config.{field}: no field {part!r} in {spec.group(1)}"
                node = node[part]


def test_runs_smoke_and_real_config(code_cells):
    specs = {CONFIG_FILE.search(rest).group(1) for _, rest in commands(code_cells)}
    assert "experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke" in specs
    assert "experiments/configs/cifar10_resnet18_mobilenetv2.py" in specs


def test_kdjax_attributes_exist(code_cells):
    used = 0
    for cell in code_cells:
        tree = ast.parse(python_source(cell))
        names = {}  # local name -> kdjax module object
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kdjax":
                parent = importlib.import_module(node.module)
                for alias in node.names:
                    try:
                        obj = importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        assert hasattr(parent, alias.name), f"{node.module} has no {alias.name}"
                        obj = getattr(parent, alias.name)
                    names[alias.asname or alias.name] = obj
                    used += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "kdjax":  # import kdjax.x [as y]
                        module = importlib.import_module(alias.name)
                        names[alias.asname or "kdjax"] = module if alias.asname else importlib.import_module("kdjax")
        for node in ast.walk(tree):
            # a.b.c where a is a kdjax name: check each attribute in turn
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in names and chain:
                obj = names[node.id]
                for attr in reversed(chain):
                    assert hasattr(obj, attr), f"{node.id}.{'.'.join(reversed(chain))}: no {attr!r}"
                    obj = getattr(obj, attr)
                used += 1
    assert used, "the notebook uses nothing from kdjax"


def test_install_cell_brings_tensorflow_and_tpu_jax(code_cells):
    install = [c for c in code_cells if "pip install" in c]
    assert install, "no install cell"
    text = "\n".join(install)
    assert "jax[tpu]" in text
    assert "[tfds]" in text or re.search(r"pip install[^\n]*\btensorflow", text), \
        "the install cell must install TensorFlow (kdjax's tfds extra or tensorflow itself)"
    if "[tfds]" in text:  # the extra must really contain TensorFlow
        pyproject = (ROOT / "pyproject.toml").read_text()
        tfds_extra = re.search(r"^tfds = \[(.*?)\]", pyproject, re.S | re.M).group(1)
        assert "tensorflow-datasets" in tfds_extra and re.search(r'"tensorflow(-cpu)?[>=<;\s]', tfds_extra)


def test_kernel_stays_off_the_tpu(code_cells):
    """A TPU admits one process: kernel cells that import jax/kdjax must pin JAX to the CPU first,
    or the `!python -m experiments...` training subprocesses cannot get the TPU."""
    for cell in code_cells:
        src = python_source(cell)
        first_import = re.search(r"^\s*(import|from)\s+(jax|kdjax)\b", src, re.M)
        if first_import:
            assert 'os.environ["JAX_PLATFORMS"] = "cpu"' in src[: first_import.start()], cell[:80]
