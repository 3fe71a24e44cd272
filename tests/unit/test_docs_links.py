"""Every relative link in README.md, BENCHMARKS.md and docs/*.md resolves: the file exists, and the heading.

Anchors follow GitHub's rule for heading ids: lower case, characters other than
letters, digits, spaces, hyphens and underscores dropped, spaces turned into
hyphens, a repeated id suffixed ``-1``, ``-2``, ... Fenced code blocks are
skipped (a ``# comment`` in a shell block is not a heading, a ``[x](y)`` in
code is not a link).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in HEADING.findall(_prose(page.read_text())):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", _prose(page.read_text())))


def test_the_slug_rule() -> None:
    assert github_anchor("Recording usage (the SDK)") == "recording-usage-the-sdk"
    assert github_anchor("What Faust runs and why the rating path reads in batches") == (
        "what-faust-runs-and-why-the-rating-path-reads-in-batches"
    )
    assert github_anchor("The `enforcement-state` topic") == "the-enforcement-state-topic"


def test_the_link_finder_skips_code() -> None:
    text = "see [a](a.md) and `[b](b.md)`\n```\n[c](c.md)\n# not a heading\n```\n"
    assert LINK.findall(INLINE_CODE.sub("", _prose(text))) == ["a.md"]
    assert HEADING.findall(_prose(text)) == []


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    for name in ("architecture.md", "storage.md", "pricing.md", "budgets.md", "operations.md", "web.md",
                 "security.md", "testing.md", "benchmarks.md", "billing.md", "backfill.md",
                 "opentelemetry.md", "provider-reconciliation.md"):  # fmt: skip
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
            broken.append(f"{target}: no file {where}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_page() -> None:
    linked = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    missing = {p.name for p in PAGES if p.parent.name == "docs"} - linked
    assert not missing, f"README.md does not link {sorted(missing)}"


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024
