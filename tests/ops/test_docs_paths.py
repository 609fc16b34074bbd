"""The README and the docs point only inside the repository, and every file they name exists, so
a layout change cannot leave the map describing files that are gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path as the docs write it: a top-level folder of ours, then a file with an ending
# (an optional ::test or `:line` suffix is not part of it).
NAMED_FILE = re.compile(
    r"(?<![\w/.-])((?:app|sql|migrations|tests|docs|bench)/[\w./-]*\w\.(?:py|sql|md|conf|csv|toml))"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_file_the_docs_name_exists():
    missing = [
        f"{doc.relative_to(ROOT)}: {name}"
        for doc in DOCS
        for name in sorted(set(NAMED_FILE.findall(doc.read_text())))
        if not (ROOT / name).exists()
    ]
    assert missing == []


def test_links_stay_inside_the_repository():
    outside = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue  # a web address is not a file of this repository
            resolved = (doc.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                outside.append(f"{doc.relative_to(ROOT)}: {target}")
        if "../shared" in doc.read_text():
            outside.append(f"{doc.relative_to(ROOT)}: ../shared")
    assert outside == []
