"""The notebooks execute top to bottom on small checkpoints (nbclient, a kernel on this interpreter)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL = "alignment-test"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec on this test's Python, so the notebook imports this checkout offline."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # figures go inline, into the outputs
    return KERNEL


def execute(path: Path, kernel: str):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=240,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def outputs_text(nb) -> str:
    return "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


def test_gatt_attention_notebook_executes(kernel, nano_model_dir, monkeypatch):
    monkeypatch.setenv("GATT_BEFORE", str(nano_model_dir))
    monkeypatch.setenv("GATT_AFTER", str(nano_model_dir))
    monkeypatch.setenv("GATT_TURNS", "3")
    monkeypatch.setenv("GATT_MAX_NEW_TOKENS", "6")
    nb = execute(REPO / "notebooks" / "gatt_attention.ipynb", kernel)
    text = outputs_text(nb)
    assert "system instruction:" in text
    assert text.count("attention on the system prompt per turn") == 2
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
