"""The tutorial notebooks in ``notebooks/`` run top to bottom and are committed without outputs.

Each notebook is executed with nbclient in the ``python3`` kernel, in its own temporary working
directory, with ``SIM2OBS_NB_SMALL=1`` (the notebooks then choose tiny sizes; the defaults are
for people) and ``MPLBACKEND=Agg``. ``OMP_NUM_THREADS`` defaults to 1: on a busy 2-core CI
machine torch's intra-op threads otherwise oversubscribe the CPU and tiny trainings run tens of
times slower. The four together take a few minutes on 2 CPU cores.
"""

import json
import math
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_mock_surveys.ipynb",
    "02_pretraining_and_probes.ipynb",
    "03_adaptation_and_gap.ipynb",
    "04_bring_your_own_data.ipynb",
)
#: Seconds allowed per cell (the slowest cell renders the pseudo-real target set).
CELL_TIMEOUT_S = 420

#: Files each notebook must leave in its working directory.
EXPECTED_FILES = {
    "01_mock_surveys.ipynb": ["nb01_work/mocks_hsc/hsc-00000.h5", "nb01_work/hsc_grid.png"],
    "02_pretraining_and_probes.ipynb": ["nb02_work/run_simclr/checkpoint.pt",
                                        "nb02_work/embeddings_hsc.h5"],
    "03_adaptation_and_gap.ipynb": ["nb03_work/run_none/summary.json",
                                    "nb03_work/run_sinkhorn/summary.json",
                                    "nb03_work/predictions_sinkhorn.csv",
                                    "nb03_work/gap/metrics.json", "nb03_work/gap/report.html"],
    "04_bring_your_own_data.ipynb": ["nb04_work/real_hsc/hsc-00000.h5",
                                     "nb04_work/real_legacy/hsc-00000.h5",
                                     "nb04_work/real_h5/hsc-00000.h5",
                                     "nb04_work/real_hdf/hdf-00000.h5"],
}


def _read(name):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def test_the_four_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{name} cell {i} has outputs: clear them"
            assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"
    assert any("SIM2OBS_NB_SMALL" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SIM2OBS_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("SIM2OBS_CACHE", str(tmp_path / "cache"))  # never the user's cache
    nb = _read(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    for rel in EXPECTED_FILES[name]:
        assert (tmp_path / rel).is_file(), f"{name} did not write {rel}"
    if name.startswith("03"):
        metrics = json.loads((tmp_path / "nb03_work/gap/metrics.json").read_text())
        for block in ("embedding", "embedding_adapted"):
            auc = metrics[block]["c2st_auc"]["value"]
            assert math.isfinite(auc) and 0.0 <= auc <= 1.0
