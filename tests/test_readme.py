"""The README's commands and numbers stay true."""

from __future__ import annotations

import re

from conftest import PYTHON, ROOT, run_cli


def test_results_block_is_generated_from_the_reports():
    result = run_cli(PYTHON, str(ROOT / "bench" / "update_readme.py"), "--check")
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test.sh" in readme.split("## Step by step")[0]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_script_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"\b((?:scripts|training|handler|ui)/[\w./-]+\.(?:py|sh|yaml))", readme)):
        assert (ROOT / path).is_file(), path
