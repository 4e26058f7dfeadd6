"""`make notebooks`: run the analysis notebooks on a finished run and write them as pages a browser opens offline.

    python -m alignment.notebooks [--run runs/demo] [--out runs/demo/notebooks] [--only gatt_attention]

Each notebook in notebooks/ is executed top to bottom (nbclient, a kernel on this interpreter, from the
repository root) against `--run` (the notebooks read it through their environment parameters: ALIGN_RUN_DIR,
ALIGN_PPO_DIR, GATT_RUN), saved executed as `<out>/<name>.ipynb` and rendered as `<out>/<name>.html`: plots
embedded, and none of nbconvert's remote scripts (MathJax, require.js from a CDN), so the page loads without
a network and without console errors (tests/test_notebooks.py opens one in headless Chromium).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "alignment-notebooks"
# a <script src="http..."></script> nbconvert's templates add for MathJax / require.js: offline, each is an error
_REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>\s*', re.I)


def run_environment(run: Path) -> dict[str, str]:
    """The notebooks' parameters for the run directory `run` (a `make demo` layout)."""
    return {"ALIGN_RUN_DIR": str(run), "ALIGN_PPO_DIR": str(run / "ppo"), "GATT_RUN": str(run / "gatt")}


def kernelspec(root: Path) -> str:
    """A kernel on this interpreter under `root`/kernels (put `root` on JUPYTER_PATH); its name."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL, "language": "python"}))
    return KERNEL


def execute(path: Path, kernel: str, timeout: int = 1800):
    """The notebook at `path`, executed in `kernel` from its own folder (it moves to the repository root)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=timeout,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def to_html(nb) -> str:
    """An executed notebook as one offline HTML page: plots embedded, no remote scripts."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    return _REMOTE_SCRIPT.sub("", body)


def render(names: list[str], run: Path, out: Path) -> list[Path]:
    """Execute and render `names` (notebook stems) against `run`; the pages written."""
    import nbformat

    out.mkdir(parents=True, exist_ok=True)
    pages = []
    with tempfile.TemporaryDirectory() as jupyter:
        os.environ["JUPYTER_PATH"] = jupyter
        os.environ.update(run_environment(run.resolve()))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # no progress bars in the saved outputs (tqdm's own, transformers' "Loading weights")
        os.environ.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                          PYTHONWARNINGS="ignore:IProgress not found")  # tqdm.auto without ipywidgets
        os.environ.pop("MPLBACKEND", None)  # figures inline, into the outputs
        kernel = kernelspec(Path(jupyter))
        for name in names:
            print(f"[notebooks] {name}: executing on {run}", flush=True)
            nb = execute(NOTEBOOKS / f"{name}.ipynb", kernel)
            nbformat.write(nb, out / f"{name}.ipynb")
            page = out / f"{name}.html"
            page.write_text(to_html(nb))
            pages.append(page)
            print(f"[notebooks] {name}: {page}", flush=True)
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `make demo` run directory")
    parser.add_argument("--out", default=None, help="where the executed notebooks and pages go (<run>/notebooks)")
    parser.add_argument("--only", action="append", default=None, help="a notebook's name (repeatable)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    names = args.only or sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    unknown = sorted(set(names) - {p.stem for p in NOTEBOOKS.glob("*.ipynb")})
    if unknown:
        print(f"--only: no notebook {unknown} in {NOTEBOOKS}", file=sys.stderr)
        return 2
    if not (run / "manifest.json").is_file():
        print(f"--run: {run} has no manifest.json; run `make demo` first", file=sys.stderr)
        return 2
    render(names, run, Path(args.out) if args.out else run / "notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
