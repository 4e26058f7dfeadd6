"""docs/method.md is the one note the code cites: every `docs/method.md#anchor` in the repository must name a
heading of it, and the note must carry the numbers the code takes from the paper."""
import re
from pathlib import Path

from alignment.config import SAFETY_THRESHOLD
from alignment.losses import MARGINS

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"
CITING = ("alignment", "notebooks", "recipes", "tests", "benchmarks", "scripts")


def _anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _citations() -> list[tuple[str, str]]:
    cited = []
    files = [ROOT / "README.md", ROOT / "Makefile"]
    for d in CITING:
        files += [p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in {".py", ".ipynb", ".yaml", ".md"}]
    for p in files:
        if p.resolve() == Path(__file__).resolve():
            continue
        for anchor in re.findall(r"docs/method\.md#([\w\-]+)", p.read_text(encoding="utf-8")):
            cited.append((str(p.relative_to(ROOT)), anchor))
    return cited


def test_every_cited_section_exists():
    anchors = _anchors(METHOD.read_text(encoding="utf-8"))
    cited = _citations()
    assert len({f for f, _ in cited}) >= 10, "the stage modules, recipes and notebooks cite docs/method.md"
    missing = [(f, a) for f, a in cited if a not in anchors]
    assert not missing, f"citations of docs/method.md sections that do not exist: {missing}"


def test_anchor_rule_matches_github():
    assert _anchors("## Ghost Attention\n### PPO hyper-parameters\n## Whitened logit (and KL)\n") == {
        "ghost-attention", "ppo-hyper-parameters", "whitened-logit-and-kl"}


def test_no_citation_of_the_outside_note():
    outside = [f for f, _ in _citations() if "LLAMA2_METHOD" in (ROOT / f).read_text(encoding="utf-8")]
    assert not outside, f"cite docs/method.md, not LLAMA2_METHOD.md (not in the repository): {outside}"


def test_method_note_states_the_code_constants():
    text = METHOD.read_text(encoding="utf-8")
    assert f"Rs(g | p) < {SAFETY_THRESHOLD:g}" in text
    small = "| margin \"small\" | 1 | 2/3 | 1/3 | 0 |"
    large = "| margin \"large\" | 3 | 2 | 1 | 0 |"
    assert small in text and large in text
    # the note's table and the code's table agree, rating by rating
    assert [MARGINS["small"][r] for r in ("significantly_better", "better", "slightly_better")] == [1.0, 2 / 3, 1 / 3]
    assert [MARGINS["large"][r] for r in ("significantly_better", "better", "slightly_better")] == [3.0, 2.0, 1.0]
    assert MARGINS["small"]["negligibly_better"] == MARGINS["large"]["unsure"] == 0.0
