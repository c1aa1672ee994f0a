"""The README and docs/ stay true: generated blocks match the reports, links and named files exist."""

from __future__ import annotations

import re

import pytest
from conftest import PYTHON, ROOT, run_cli

from bench.render_docs import BLOCK, markdown_headings, pages, render, source_text

README = ROOT / "README.md"


def test_generated_blocks_match_the_reports():
    result = run_cli(PYTHON, "-m", "bench.render_docs", "--check")
    assert result.returncode == 0, result.stderr


def test_render_fills_a_block_from_a_report(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "x.md").write_text("# Title\n\n| a |\n|---|\n| 1 |\n")
    page = "intro\n<!-- generated: reports/x.md -->\nstale\n<!-- /generated -->\nend\n"
    assert (
        render(page, tmp_path)
        == "intro\n<!-- generated: reports/x.md -->\n| a |\n|---|\n| 1 |\n<!-- /generated -->\nend\n"
    )
    with pytest.raises(FileNotFoundError, match="reports/missing.md"):
        render(page.replace("x.md", "missing.md"), tmp_path)


def test_a_blocks_headings_nest_under_the_heading_it_sits_in(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "x.md").write_text("# Title\n\n## Part\n\n```bash\n# a comment\n```\n\n### Detail\n")
    block = "<!-- generated: reports/x.md -->\n<!-- /generated -->\n"
    page = "# Page\n\n```bash\n# a comment, not a heading\n```\n\n### Section\n" + block
    assert render(page, tmp_path).endswith(
        "### Section\n<!-- generated: reports/x.md -->\n#### Part\n\n```bash\n# a comment\n```\n\n##### Detail\n"
        "<!-- /generated -->\n"
    )
    assert render(block, tmp_path).startswith("<!-- generated: reports/x.md -->\n# Part\n")


def test_no_page_skips_a_heading_level():
    for page in pages():
        lines = page.read_text().split("\n")
        above = 0
        for index, level in markdown_headings(lines):
            assert level <= above + 1, f"{page.name}:{index + 1}: {lines[index]!r} follows a level-{above} heading"
            above = level


def test_every_block_names_an_existing_source():
    sources = [m["source"] for page in pages() for m in BLOCK.finditer(page.read_text())]
    assert sources, "no generated block in the docs"
    for source in sources:
        assert source_text(source).strip(), source


def test_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "scripts/test.sh" in text.split("## What to expect")[0]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_links_and_named_files_exist():
    for page in pages():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"
        named = re.findall(
            r"(?<![\w/.-])((?:scripts|training|handler|ui|bench|cifar3|cifar3_client|deploy)/[\w./-]+\.(?:py|sh|yaml))",
            text,
        )
        for path in set(named):
            assert (ROOT / path).is_file(), f"{page.name} names {path}"


def test_no_development_diary_in_what_users_read():
    diary = re.compile(r"\b(this|last|previous|next|earlier) session\b|\bour runs\b|\bwe tried\b|\bissue \d+", re.I)
    for page in pages():
        assert not diary.search(page.read_text()), page.name
