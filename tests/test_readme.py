"""The README is self-contained and agrees with the code: it opens with the two commands
that .ci/run and the Makefile use, links nowhere outside the repository, names only files
that exist, and its pass table is the pipeline's order."""

import re
from pathlib import Path

from fusegen.config import CompileConfig
from fusegen.passes.pipeline import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FOLDERS = ("fusegen", "passes", "codegen", "runtime", "tests", "examples", "docs", "bench", ".ci")


def _commands(block: str) -> list[str]:
    return [line.split("#")[0].strip() for line in block.strip().splitlines() if line.split("#")[0].strip()]


def test_opens_with_the_two_commands():
    title, rest = README.split("\n", 1)
    assert title == "# fusegen"
    first_block = re.match(r"\s*```bash\n(.*?)```", rest, re.S)
    assert first_block, "the README must open with its commands, before any prose"
    assert _commands(first_block.group(1)) == ["make run", "make test"]


def test_ci_runs_the_readme_test_command_which_runs_pytest():
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert ci[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = re.search(r"^test: .*\n\t(.*)\n", makefile, re.M).group(1)
    assert test_recipe == "$(PYTHON) -m pytest -q"
    assert re.search(r"^run: .*\n\t.*fusegen-cli generate --prompt", makefile, re.M)


def test_links_nowhere_outside_the_repository():
    outside = [url for url in re.findall(r"(?:https?://|www\.)[^\s\"')`]*", README)
               if not re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", url)]  # a local server is fine
    assert not outside, outside
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert (ROOT / target.split("#")[0]).exists(), target


def test_every_repository_path_it_names_exists():
    named = set(re.findall(rf"`((?:{'|'.join(map(re.escape, FOLDERS))})/[\w./-]*)`", README))
    assert len(named) > 20
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def _table_after(heading: str) -> list[list[str]]:
    section = README[README.index(heading):]
    rows = re.findall(r"^\|(.*)\|$", section[:section.index("\n\n", section.index("|"))], re.M)
    return [[cell.strip() for cell in row.split("|")] for row in rows[2:]]


def test_pass_table_is_the_pipeline():
    rows = _table_after("### The passes")
    everything = CompileConfig(gqa_kv_heads=1, weights="int8", kv_dtype="fp8")
    # tp > 1 excludes weights=int8: its pass is merged in where its own pipeline puts it
    names = [p.name for p in build_pipeline(everything)]
    sharded = [p.name for p in build_pipeline(CompileConfig(gqa_kv_heads=1, kv_dtype="fp8", tp=2))]
    for before, name in zip(sharded, sharded[1:]):
        if name not in names:
            names.insert(names.index(before) + 1, name)
    assert [name.strip("`") for _, name, _ in rows] == names
    default = [p.name for p in build_pipeline(CompileConfig())]
    for step, name, _ in rows:
        name = name.strip("`")
        assert step == (f"{default.index(name) + 1:02d}" if name in default else "opt-in"), name


def test_examples_table_lists_every_example():
    listed = [name.strip("`") for name, _ in _table_after("## Examples")]
    assert sorted(listed) == sorted(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py"))
