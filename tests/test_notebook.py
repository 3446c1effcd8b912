"""notebooks/l2r_colab.ipynb, executed top to bottom in a Jupyter kernel in its smoke setting.

The kernel inherits this process's environment (conftest.py's 8 virtual CPU devices, so the
notebook's training runs the sharded loop on 8 devices) plus L2R_NOTEBOOK_SMOKE and the workdir.
A check cell appended to the in-memory copy reports the kernel's own variables back as JSON.
"""
import json
import math
import sys
from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from configs import vit as vit_config

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "l2r_colab.ipynb"
CHECK_TAG = "L2R_NOTEBOOK_CHECK "
CHECK_CELL = f"""import json
print({CHECK_TAG!r} + json.dumps({{
    "prefix": sys.prefix, "smoke": SMOKE, "workdir": WORKDIR, "backend": jax.default_backend(),
    "devices": mesh.size, "image": list(image.shape), "map": list(attribution.shape),
    "map_finite": bool(np.isfinite(attribution).all()),
    "input_size": list(target.input_size)}}))"""


def test_notebook_is_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [] and cell.execution_count is None, (
        f"code cell {i} has stored outputs or an execution count; clear them before committing")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(the executed notebook, its workdir, the check cell's report)."""
  tmp = tmp_path_factory.mktemp("notebook")
  workdir = tmp / "workdir"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("L2R_NOTEBOOK_SMOKE", "1")
    mp.setenv("L2R_NOTEBOOK_WORKDIR", str(workdir))
    mp.setenv("IPYTHONDIR", str(tmp / "ipython"))  # no history or profile written to the home
    # 'python3' is the kernelspec ipykernel installs into this venv; jupyter_client starts its
    # 'python' as sys.executable (checked below through sys.prefix).
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp)}}).execute()
  reports = [line[len(CHECK_TAG):] for out in nb.cells[-1].outputs if out.get("name") == "stdout"
             for line in out.text.splitlines() if line.startswith(CHECK_TAG)]
  assert len(reports) == 1, f"the check cell printed no report: {nb.cells[-1].outputs}"
  return nb, workdir, json.loads(reports[0])


def test_kernel_runs_the_smoke_setting_here(executed):
  _, workdir, report = executed
  assert report["prefix"] == sys.prefix, "the kernel runs another Python than the tests"
  assert report["smoke"] is True
  assert report["workdir"] == str(workdir)
  # conftest.py's platform and device count reach the kernel: the sharded loop ran on all of them.
  assert (report["backend"], report["devices"]) == (jax.default_backend(), jax.device_count())


def test_training_wrote_the_heldout_result(executed):
  _, workdir, _ = executed
  with open(workdir / "eval.json") as f:
    heldout = json.load(f)
  assert heldout["n"] == vit_config.get_config("smoke").eval.num_examples
  for method in ("explainer", "random"):
    for k in ("deletion", "insertion"):
      assert 0.0 <= heldout[method][k] <= 1.0, (method, k, heldout[method][k])


def test_evaluation_scored_l2r_beside_baselines(executed):
  nb, workdir, _ = executed
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert set(results["methods"]) == {"l2r", "random", "gradient"}
  assert list(results["protocols"]) == ["paper"]
  for method, row in results["methods"].items():
    for k in ("deletion", "insertion"):
      stats = row["paper"][k]
      assert stats["n"] == 8, (method, k, stats)  # the smoke NUM_EXAMPLES
      assert math.isfinite(stats["mean"]) and 0.0 <= stats["mean"] <= 1.0, (method, k, stats)
  for name in ("results.md", "examples.png", "curves.png"):
    assert (workdir / name).stat().st_size > 0, name
  table = [out for cell in nb.cells for out in cell.get("outputs", [])
           if "text/markdown" in out.get("data", {})]
  assert len(table) == 1 and "| l2r |" in table[0]["data"]["text/markdown"]


def test_explain_cell_shows_a_map_of_the_image(executed):
  nb, _, report = executed
  h, w = report["input_size"]
  assert report["image"] == [h, w, 3]
  assert report["map"] == [h, w], "the map must have the image's height and width"
  assert report["map_finite"]
  # examples.png, curves.png and the matplotlib figure of the explain cell (inline: evaluate's
  # plotting leaves the notebook's backend alone).
  pngs = [out for cell in nb.cells for out in cell.get("outputs", [])
          if "image/png" in out.get("data", {})]
  assert len(pngs) == 3, f"expected 3 pictures in the outputs, got {len(pngs)}"
