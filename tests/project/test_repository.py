"""What is tracked must work on a machine that has never seen this repository: no link that
leaves the repository, no local artefact (a venv, the embedded cluster, benchmark output,
caches). A `.venv` link to a developer's folder once broke every fresh clone while CI, run on
that developer's machine, stayed green; this guard runs in `make test`, hence in CI.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
from pathlib import Path

import pytest

from workers.settings import REPO_ROOT

# Names that are local artefacts wherever they appear in a path.
ARTEFACTS = frozenset(
    {
        ".venv",
        "venv",
        ".pgdata",
        "bench-out",
        "node_modules",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
    }
)
ARTEFACT_SUFFIXES = (".egg-info", ".pyc")
LINK_MODE = "120000"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def link_leaves_repository(path: str, target: str) -> bool:
    """True when a link at `path` (relative to the top) to `target` points outside the tree."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved == ".." or resolved.startswith("../")


def is_artefact(path: str) -> bool:
    parts = path.split("/")
    return any(p in ARTEFACTS or p.endswith(ARTEFACT_SUFFIXES) for p in parts)


def tracked_problems(repo: Path) -> list[str]:
    """Every tracked path that would break or pollute a fresh clone, with why."""
    problems: list[str] = []
    for line in git(repo, "ls-files", "-s", "-z").split("\0"):
        if not line:
            continue
        meta, path = line.split("\t", 1)
        mode, blob = meta.split()[:2]
        if is_artefact(path):
            problems.append(f"{path}: a local artefact is tracked (git rm -r --cached {path})")
        if mode == LINK_MODE:
            target = git(repo, "cat-file", "-p", blob)
            if link_leaves_repository(path, target):
                problems.append(
                    f"{path} -> {target}: a tracked link leaves the repository; "
                    f"a fresh clone elsewhere breaks on it (git rm --cached {path})"
                )
    return problems


def is_git_checkout(path: Path) -> bool:
    return (path / ".git").exists()


def test_nothing_tracked_breaks_a_fresh_clone() -> None:
    if not is_git_checkout(REPO_ROOT):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REPO_ROOT} is not a git checkout: CI must run on a clone")
        pytest.skip("not a git checkout: nothing is tracked")
    assert tracked_problems(REPO_ROOT) == []


@pytest.mark.parametrize(
    ("path", "target", "leaves"),
    [
        (".venv", "/work/wt15/.venv", True),
        ("docs/x", "../../elsewhere", True),
        ("docs/x", "../..", True),
        ("docs/x", "..", False),
        ("docs/x", "../README.md", False),
        ("x", "docs/console-trace.png", False),
        ("a/b/c", "../../d", False),
        ("x", "C:/Users/x", True),
    ],
)
def test_link_targets(path: str, target: str, leaves: bool) -> None:
    assert link_leaves_repository(path, target) is leaves


@pytest.mark.parametrize(
    ("path", "artefact"),
    [
        (".venv", True),
        (".pgdata/cluster", True),
        ("bench-out/results.json", True),
        ("workers/__pycache__/x.pyc", True),
        ("koding_caravan_pipeline.egg-info/PKG-INFO", True),
        ("workers/runtime/worker.py", False),
        ("docs/venvs.md", False),
    ],
)
def test_artefact_names(path: str, artefact: bool) -> None:
    assert is_artefact(path) is artefact


def test_guard_fails_on_a_commit_that_tracks_such_a_link(tmp_path: Path) -> None:
    """The guard itself, on a scratch repository: the commit that broke every clone, redone."""
    repo = tmp_path / "scratch"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README.md").write_text("scratch\n", encoding="utf-8")
    (repo / ".venv").symlink_to("/work/wt15/.venv")
    (repo / "inside").symlink_to("README.md")
    (repo / "bench-out").mkdir()
    (repo / "bench-out" / "results.json").write_text("{}\n", encoding="utf-8")
    # -f: the scratch repository has no .gitignore, as the broken commit's did not match links.
    git(repo, "add", "-f", ".")
    problems = tracked_problems(repo)
    assert len(problems) == 3, problems
    assert any(p.startswith(".venv -> /work/wt15/.venv") for p in problems)
    assert any(p.startswith(".venv: a local artefact") for p in problems)
    assert any(p.startswith("bench-out/results.json") for p in problems)
    assert not any(p.startswith("inside") for p in problems)


def test_gitignore_keeps_artefacts_out_in_any_form() -> None:
    """A link, a file or a folder named like an artefact is ignored by the repository's rules."""
    if not is_git_checkout(REPO_ROOT):
        pytest.skip("not a git checkout")
    names = [".venv", ".pgdata", "bench-out", "venv", "node_modules"]
    ignored = git(REPO_ROOT, "check-ignore", "--no-index", *names).split()
    assert sorted(ignored) == sorted(names)
    # `.venv/` (with a slash) matched only folders: a link of that name slipped through.
    rules = (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").split()
    for name in (".venv", ".pgdata", "bench-out"):
        assert name in rules, f".gitignore should name {name} without a trailing slash"
