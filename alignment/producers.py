"""Which command makes a missing input: "made by `make sft` (recipes/tiny/sft.yaml)" for the one-line error of a
stage whose model or data file is not there yet.

The single-stage make targets run the tiny recipes, each reading what an earlier target wrote (`make data` ->
runs/data/toyworld, `make pretrain` -> runs/tiny/base, `make sft` -> runs/tiny/sft, ...), while `make demo` writes
its own copies under runs/demo/. The producers are read from the Makefile and the recipes in the working
directory (the repository root, where make and the recipes' relative paths run), so this list cannot drift from
them; elsewhere there is no hint.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

_STAGE_TARGET = re.compile(r"^([a-z][a-z0-9-]*): install\n\t\$\(BIN\)/align ([a-z-]+) --recipe \$\(or \$\(RECIPE\),"
                           r"(recipes/[^)]+\.yaml)\)", re.M)
_PIPELINE_TARGET = re.compile(r"^([a-z][a-z0-9-]*): [a-z-]+\n\t\$\(BIN\)/align pipeline --recipe (recipes/\S+\.yaml)$", re.M)
_NOT_STAGES = ("plan", "pipeline")  # the planner writes nothing; the pipeline's own runs are made by `make demo`
_DATA_TARGET = re.compile(r"^([a-z][a-z0-9-]*): install\n\t\$\(BIN\)/align data toyworld --out \$\(or \$\(OUT\),"
                          r"([^)]+)\)", re.M)


def producers(root: str | Path = ".") -> list[tuple[str, str, str]]:
    """(output directory, make target, recipe or "") of every single-stage make target under `root`."""
    root = Path(root)
    try:
        makefile = (root / "Makefile").read_text()
    except OSError:
        return []
    out = [(m[2].strip(), m[1], "") for m in _DATA_TARGET.finditer(makefile)]
    found = [(m[1], m[3]) for m in _STAGE_TARGET.finditer(makefile) if m[2] not in _NOT_STAGES]
    found += [(m[1], m[2]) for m in _PIPELINE_TARGET.finditer(makefile)]
    for target, recipe_path in found:
        try:
            recipe = yaml.safe_load((root / recipe_path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        out_dir = (recipe.get("output") or {}).get("dir") if isinstance(recipe, dict) else None
        if isinstance(out_dir, str):
            out.append((out_dir, target, recipe_path))
    return out


def made_by(path: str | Path, root: str | Path = ".") -> str:
    """" (made by `make T`, recipes/...; ...)" for a missing relative input path under a make target's output,
    else ""."""
    text = Path(path).as_posix().removeprefix("./")
    for out_dir, target, recipe in producers(root):
        out_dir = out_dir.rstrip("/")
        if text == out_dir or text.startswith(out_dir + "/"):
            what = f"`make {target}`" + (f" ({recipe})" if recipe else "")
            if target.startswith("demo"):
                return f" (made by {what})"
            return f" (made by {what}; `make demo` writes its own copy under runs/demo/ instead)"
    return ""
