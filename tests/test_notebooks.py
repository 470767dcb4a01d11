"""Every notebook runs top to bottom, shows at least one figure and writes nothing to stderr but progress bars.

Outputs are stripped in git. The kernel imports this checkout's packages (the repository root is put first on
its PYTHONPATH), whether or not the project is pip-installed and wherever an editable install points. diffusers
imports ``tqdm.auto``, which warns "IProgress not found" on stderr in a kernel without ipywidgets: the ``dev`` and
``notebooks`` extras install it.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: one tqdm bar refresh, e.g. "sampling:  40%|####      | 2/5 [00:00<00:00, 9.1it/s]"
PROGRESS_BAR = re.compile(r"^[^\n]*\d+/\d+ \[[\d:]+<[\d:?]+,[^\]]*\]$")


def is_progress_bar(text: str) -> bool:
    """True if every non-blank line of a stderr stream (bars redraw with carriage returns; a closing bar may write
    a bare newline) is a tqdm bar."""
    return all(PROGRESS_BAR.match(line.strip()) for line in re.split(r"[\r\n]+", text) if line.strip())


def kernel_env() -> dict[str, str]:
    """The test's environment with the repository root first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])])}


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 5
    assert NOTEBOOKS[0].name == "00_first_look.ipynb"


def test_progress_bar_filter():
    assert is_progress_bar("\rsampling:  40%|####      | 2/5 [00:00<00:01,  9.12it/s]\r"
                           "sampling: 100%|##########| 5/5 [00:00<00:00, 10.0it/s]\n")
    assert is_progress_bar("100%|##########| 3/3 [00:01<00:00,  2.50block/s]\n")
    assert is_progress_bar("sampling:  17%|#7        | 3/18 [00:00<00:00, 21.57block/s, gmm / unipc / NFE 10]   ")
    assert is_progress_bar("\n")
    assert not is_progress_bar("TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.\n")
    assert not is_progress_bar("UserWarning: something\n  warnings.warn(\n")
    assert not is_progress_bar("| dpm | 5 | 0.1 |\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "strip outputs before commit"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "open with a title"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_env())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert images, "the notebook shows no figure"
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert all(is_progress_bar(text) for text in stderr), [t for t in stderr if not is_progress_bar(t)]


def test_kernel_imports_this_checkout():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import guidance, samplers\n"
                                                                   "print(samplers.__file__, guidance.__file__)")])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute(env=kernel_env())
    files = nb.cells[0].outputs[0].text.split()
    assert [Path(f).resolve().parent.parent for f in files] == [ROOT, ROOT]
