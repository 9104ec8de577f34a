"""docs/request.md's "Follow a request": a spine of at most 9 hand-written files of about 400
lines at most, each of them (and every helper the page names) present in the tree."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "docs" / "request.md").read_text()
MAX_LINES = 410          # "at most ~400"


def _spine() -> list[Path]:
    rows = re.findall(r"^\| (\d+) \| `([^`]+\.py)`", TEXT, re.M)
    return [ROOT / path for _, path in rows]


def test_the_spine_is_at_most_nine_short_files():
    spine = _spine()
    assert 0 < len(spine) <= 9, [p.name for p in spine]
    too_long = {p.relative_to(ROOT).as_posix(): n for p in spine
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"spine files over ~400 lines: {too_long}"


def test_every_file_the_page_names_exists():
    named = set(re.findall(r"`((?:[\w]+/)+[\w]+\.py)`", TEXT))
    missing = []
    for path in named:
        candidates = [ROOT / path, ROOT / "pearl_runtime" / path]
        if not any(c.is_file() for c in candidates):
            missing.append(path)
    assert not missing, missing
