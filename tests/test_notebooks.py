"""The notebooks under notebooks/ run end to end, as a user would run them, on the sample data: the
exploration notebook on the prepared sample, the prediction notebook on a model trained by the real
`python src/train_model.py` against a real MLflow server."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import kiln
from conftest import REPO, run_app

NOTEBOOKS = REPO / "notebooks"
EXPLORE = NOTEBOOKS / "01-explore-processed-data.ipynb"
PREDICT = NOTEBOOKS / "02-predict-with-mlflow-model.ipynb"


@pytest.fixture(scope="module", autouse=True)
def python3_kernel(tmp_path_factory: pytest.TempPathFactory):
    """The `python3` kernelspec of ipykernel, running this interpreter, first on JUPYTER_PATH."""
    import ipykernel.kernelspec

    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.install(prefix=str(prefix))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.name == "stdout"
    )


def image_count(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", [EXPLORE, PREDICT], ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs_and_parameters_first(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "os.environ.get(" in code[0].source


def test_explore_notebook_shows_the_manifests_class_counts_samples_and_normalisation(
    tmp_path: Path, processed_sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_PROCESSED_DIR", str(processed_sample))
    notebook = execute(EXPLORE, tmp_path)
    text = printed(notebook)

    manifest = kiln.read_manifest(processed_sample)
    table = text[text.index("\nclass") + 1 : text.index("\ntotal")].splitlines()
    splits = table[0].split()[1:]
    assert sorted(splits) == sorted(split.name for split in manifest.splits)
    shown = {line.split()[0]: dict(zip(splits, map(int, line.split()[1:]), strict=True)) for line in table[1:]}
    assert list(shown) == manifest.classes
    for split in splits:
        assert {name: counts[split] for name, counts in shown.items()} == manifest.split(split).class_counts
    assert f"mean {manifest.mean[0]:.4f} (recomputed {manifest.mean[0]:.4f})" in text
    assert f"std {manifest.std[0]:.4f} (recomputed {manifest.std[0]:.4f})" in text
    assert image_count(notebook) == 2  # the grid of samples per class, the pixel histogram


def test_predict_notebook_shows_a_trained_runs_predictions_as_class_names(
    tmp_path: Path, processed_sample: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    experiment = "notebook-predict"
    trained = run_app(
        "train_model.py",
        f"data_dir_path={processed_sample}",
        f"mlflow_tracking_uri={mlflow_server}",
        f"mlflow_exp_name={experiment}",
        "epochs=1",
        "train_limit=200",
        "test_limit=100",
        f"artifact_dir_path={tmp_path / 'models'}",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])

    # KILN_RUN_ID unset: the notebook finds the experiment's newest finished run itself.
    monkeypatch.delenv("KILN_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("KILN_EXPERIMENT", experiment)
    monkeypatch.setenv("KILN_PROCESSED_DIR", str(processed_sample))
    notebook = execute(PREDICT, tmp_path)
    text = printed(notebook)

    assert f"run {run.info.run_id} ({run.info.run_name}), status FINISHED" in text
    classes = kiln.read_manifest(processed_sample).classes
    labels = kiln.load_split(processed_sample, "test")[1]
    rows = re.findall(r"^(\d+)\s+(\S+)\s+(\S+)\s+([0-9.]+)$", text, flags=re.M)
    assert len(rows) == 12
    for index, label, prediction, probability in rows:
        assert label == classes[int(labels[int(index)])]
        assert prediction in classes
        assert 0 < float(probability) <= 1
    correct = sum(label == prediction for _, label, prediction, _ in rows)
    assert f"{correct}/12 correct" in text
    assert "kiln.Predictor and the pyfunc model agree on 12/12 images" in text
    assert image_count(notebook) == 1
