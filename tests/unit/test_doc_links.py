# The README and docs/ point at things that exist: relative links and their #anchors, and the repository
# scripts and toolkit modules their command blocks run.
"""Checked in README.md and docs/*.md:

- every relative Markdown link `[text](path)` / `[text](path#anchor)` (images too) names a file or folder of
  the repository, relative to the file that holds the link; an `#anchor` names a heading of the target
  Markdown file under GitHub's rules (lowercase, punctuation other than '-' and '_' dropped, spaces to '-',
  '-1', '-2', ... for repeated headings). http(s) and mailto links are not checked; links inside code
  (fenced blocks, `inline code`) are not links.
- every line of a ```bash block that runs a repository script (`python launch/X.py`, `python benchmarks/X.py`,
  `bash X.sh`, `launch/X.sh`, `torchrun ... X.py`, `deepspeed ... X.py`) or a `python -m toolkit...` module
  names one that exists, relative to the repository root (where the commands are run).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.conftest import REPO

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SEPARATORS = {"&&", "||", "|", ";", "&", "|&"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", "&>", ">&", "2>", "2>>"}
WRAPPERS = {"srun", "env", "time", "nohup", "exec", "sudo"}
SHELL_BLOCKS = {"bash", "sh", "shell"}


def doc_files(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """(the text with fenced blocks blanked out, [(language, lines) of every fenced block])."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if block is None and fence:
            block = (fence.group(2).lower(), [])
            prose.append("")
        elif block is not None and fence and not fence.group(2):
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    if block is not None:
        blocks.append(block)
    return "\n".join(prose), blocks


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading text."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    result = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        slug = anchor(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(text: str) -> list[str]:
    prose, _ = split_fences(text)
    prose = INLINE_CODE.sub("", prose)
    return [match.group(2) for match in LINK.finditer(prose)]


def link_problems(repo: Path, files: list[Path]) -> list[str]:
    problems = []
    for doc in files:
        where = doc.relative_to(repo).as_posix()
        for target in links(doc.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc.resolve()
            if not resolved.is_relative_to(repo.resolve()):
                problems.append(f"{where}: link {target} leaves the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}: link {target}: no such file")
                continue
            if not fragment:
                continue
            if resolved.suffix != ".md" or not resolved.is_file():
                problems.append(f"{where}: link {target}: an anchor into a file that is not Markdown")
            elif fragment not in anchors(resolved):
                problems.append(f"{where}: link {target}: no heading #{fragment} in "
                                f"{resolved.relative_to(repo.resolve()).as_posix()}")
    return problems


def command_lines(block: list[str]) -> list[str]:
    """Logical lines of a shell block (backslash continuations joined)."""
    lines, current = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append(current + line)
            current = ""
    if current:
        lines.append(current)
    return lines


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: nothing we can read
        return []


def commands(line: str) -> list[list[str]]:
    """The simple commands of one line: split at && || | ; &, redirections and their targets removed."""
    result, current, skip_next = [], [], False
    for token in tokens(line):
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            result.append(current)
            current = []
        elif token in REDIRECTS:
            skip_next = True
        else:
            current.append(token)
    result.append(current)
    return [command for command in result if command]


def repository_path(token: str) -> bool:
    """A relative path with no shell expansion or placeholder in it."""
    return not token.startswith(("/", "~", "-")) and not re.search(r"[$<>*?{}]", token)


def scripts_named(command: list[str]) -> list[tuple[str, str]]:
    """[("script", path) or ("module", dotted name)] that the command runs from the repository."""
    words = list(command)
    while words and (re.match(r"^\w+=", words[0]) or words[0] in WRAPPERS):
        words.pop(0)
    if not words:
        return []
    program, args = words[0], words[1:]
    if re.fullmatch(r"python[\d.]*", program):
        if "-m" in args:
            module = args[args.index("-m") + 1] if args.index("-m") + 1 < len(args) else ""
            return [("module", module)] if module.split(".")[0] == "toolkit" else []
        if "-c" in args:
            return []
        script = next((a for a in args if not a.startswith("-")), None)
        return [("script", script)] if script and repository_path(script) else []
    if program in ("torchrun", "deepspeed"):
        script = next((a for a in args if a.endswith(".py")), None)
        return [("script", script)] if script and repository_path(script) else []
    if program in ("bash", "sh"):
        script = next((a for a in args if not a.startswith("-")), None)
        return [("script", script)] if script and repository_path(script) else []
    if "/" in program and program.endswith((".sh", ".py")) and repository_path(program):
        return [("script", program)]
    return []


def module_exists(repo: Path, module: str) -> bool:
    base = repo.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def command_problems(repo: Path, files: list[Path]) -> list[str]:
    problems = []
    for doc in files:
        where = doc.relative_to(repo).as_posix()
        _, blocks = split_fences(doc.read_text())
        for language, block in blocks:
            if language not in SHELL_BLOCKS:
                continue
            for line in command_lines(block):
                for command in commands(line):
                    for kind, name in scripts_named(command):
                        if kind == "module" and not module_exists(repo, name):
                            problems.append(f"{where}: `python -m {name}`: no such module in the repository")
                        elif kind == "script" and not (repo / name.removeprefix("./")).is_file():
                            problems.append(f"{where}: {name}: no such script in the repository")
    return problems


def test_every_relative_link_and_anchor_resolves():
    assert not link_problems(REPO, doc_files(REPO)), "\n".join(link_problems(REPO, doc_files(REPO)))


def test_every_script_a_command_block_runs_exists():
    assert not command_problems(REPO, doc_files(REPO)), "\n".join(command_problems(REPO, doc_files(REPO)))


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links((REPO / "README.md").read_text())}
    missing = [page.name for page in sorted((REPO / "docs").glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_github_anchors():
    assert anchor("Identity-center head (benchmarks/bench_head.py)") == "identity-center-head-benchmarksbench_headpy"
    assert anchor("Benchmarks (`--benchmark NAME=PATH`, repeatable)") == "benchmarks---benchmark-namepath-repeatable"
    assert anchor("All-to-all 1:1 (MFR protocol)") == "all-to-all-11-mfr-protocol"


def test_the_checkers_see_what_is_missing(tmp_path):
    """The tests can fail: a made-up file, heading, script and module are each reported; code is not read."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "present.py").write_text("")
    (tmp_path / "README.md").write_text(
        "# Top\n\n[fine](docs/a.md#title) [fine too](#top) [web](https://example.com/nowhere.md)\n"
        "[gone](docs/missing.md) [no heading](docs/a.md#nope) and `[in code](also/missing.md)`\n\n"
        "```bash\npython launch/present.py --recipe R   # [in a fence](nowhere.md)\n```\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n\n## Title\n\n[repeated heading](#title-1) [up](../README.md#top)\n\n```bash\n"
        "python launch/missing.py --recipe R\n"
        "torchrun --nproc_per_node 2 launch/also_missing.py \\\n    --recipe R\n"
        "python -m toolkit.nothing.here\n"
        "OMP_NUM_THREADS=1 python benchmarks/gone.py && launch/gone.sh a b > /tmp/log\n"
        "bash benchmarks/run_nothing.sh\n"
        "python -m pytest -q tests   # not ours, not checked\n"
        "```\n\n```\npython launch/not_a_shell_block.py\n```\n")
    files = doc_files(tmp_path)
    assert link_problems(tmp_path, files) == [
        "README.md: link docs/missing.md: no such file",
        "README.md: link docs/a.md#nope: no heading #nope in docs/a.md",
    ]
    assert command_problems(tmp_path, files) == [
        "docs/a.md: launch/missing.py: no such script in the repository",
        "docs/a.md: launch/also_missing.py: no such script in the repository",
        "docs/a.md: `python -m toolkit.nothing.here`: no such module in the repository",
        "docs/a.md: benchmarks/gone.py: no such script in the repository",
        "docs/a.md: launch/gone.sh: no such script in the repository",
        "docs/a.md: benchmarks/run_nothing.sh: no such script in the repository",
    ]
