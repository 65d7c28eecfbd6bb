"""The quickstart notebook runs top to bottom in a fresh kernel, with a tiny run as parameters."""

import os

import nbclient
import nbformat
import pytest
from helpers import ROOT

pytestmark = [pytest.mark.system, pytest.mark.smoke]

NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")

TINY = """\
NUM_STEPS = 4
BATCH_SIZE = 8
NUM_TIMESTEPS = 10
MODEL_CH = 16
CH_MULT = (1,)
NUM_RES_BLOCKS = 1
NUM_SAMPLES = 8
DDIM_STEPS = 5
EVAL_EXAMPLES = 16
WORKDIR = {workdir!r}
"""


def _with_parameters(nb, source: str):
    """Insert ``source`` after the cell tagged ``parameters`` (as papermill does)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def test_quickstart_runs_and_draws_its_figures(tmp_path):
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY.format(workdir=str(tmp_path)))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # forward process, samples, bits/dim terms, loaded-checkpoint samples
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 steps in" in text
    assert "bits/dim on 16 test digits" in text
    assert "loaded parameters equal the trained EMA parameters: True" in text
    assert os.path.isdir(tmp_path / "checkpoints" / "4")
