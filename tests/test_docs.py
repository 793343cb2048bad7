"""The documentation says only what is there: every `moekit ...` command shown in README.md
and docs/*.md names a real sub-command and only flags it has, every relative link leads to a
file (and a heading, where it names one), every `moekit.x.y` name a page mentions exists, and
the README's Architecture section lists the floors `tests/test_layering.py` enforces.

The commands' options are read from the click command typer builds (what `--help` lists),
in this process, once per sub-command; Python names are looked up in the source with `ast`,
without importing torch: the whole file runs in about a second."""

from __future__ import annotations

import ast
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "moekit"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


# ---------------------------------------------------------------------------- reading pages

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # a span may wrap a line, never a paragraph


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The page without its fenced code blocks: what links, headings and inline code are read from."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    return [" ".join(m.group(1).split()) for m in INLINE.finditer(prose(text))]


def shell_commands(text: str) -> list[str]:
    """Every `moekit ...` command of a page: in shell code blocks (continuation lines joined,
    `&&`, `;` and `|` separating commands, `torchrun ... -m moekit` included) and in inline
    code that starts with `moekit `."""
    found = []
    for language, body in blocks(text):
        if language not in SHELL_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|(?!\w)", line):  # `a|b` inside a word is a doc's choice of values
                found += _moekit_in(part)
    for span in inline_code(text):
        if span.startswith("moekit "):
            found += _moekit_in(span)
    return found


def _moekit_in(part: str) -> list[str]:
    try:
        words = shlex.split(part, comments=True)
    except ValueError:  # an unbalanced quote: a prose fragment, not a command
        words = part.split()
    for i, word in enumerate(words):
        if word == "moekit" and (i == 0 or words[i - 1] == "-m"):
            return [shlex.join(words[i:])]
    return []


def flags(command: str) -> tuple[str, list[str]]:
    """The sub-command and the flags a documented command uses. A doc's synopsis brackets
    optional parts (`[--eval]`), joins choices with `|` and ends with `...`; values are any
    word not starting with '-' (negative numbers are values)."""
    words = [w.strip("[]") for w in shlex.split(command)[1:]]
    sub = words[0] if words else ""
    used = []
    for word in words[1:]:
        for piece in word.split("|"):
            if re.match(r"^--?[A-Za-z]", piece):
                used.append(piece.split("=", 1)[0].rstrip(",.]"))
    return sub, used


# ---------------------------------------------------------------------------- the real CLI


@cache
def _group():
    import typer.main

    from moekit.cli import app

    group = typer.main.get_command(app)
    return group, group.make_context("moekit", [], resilient_parsing=True)


@cache
def subcommands() -> frozenset[str]:
    group, ctx = _group()
    return frozenset(group.list_commands(ctx))


@cache
def options(sub: str | None) -> frozenset[str]:
    """The options `moekit SUB --help` lists (the root's for None): every spelling, short
    forms and `--no-` forms of boolean flags included; hidden ones (old spellings kept for
    compatibility) left out."""
    group, ctx = _group()
    command = group if sub is None else group.get_command(ctx, sub)
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option" and not getattr(param, "hidden", False):
            names.update(param.opts, param.secondary_opts)
    return frozenset(names)


def wrong_flags(command: str) -> list[str]:
    sub, used = flags(command)
    if sub == "":  # `python -m moekit` alone: the help
        return []
    if sub.startswith("-"):  # `moekit --version`
        return [f for f in [sub, *used] if f not in options(None)]
    if sub not in subcommands():
        return [f"no sub-command {sub!r} (there are: {', '.join(sorted(subcommands()))})"]
    return [f"{f} is not an option of `moekit {sub}`" for f in used if f not in options(sub)]


def inline_flags(text: str) -> list[tuple[str, str]]:
    """Flags named in inline code without `moekit ` before them: (`compress --resume`) is
    checked against that sub-command, a bare (`--activation-budget 2GiB`) against every
    command's options, since prose says which command it is about."""
    found = []
    for span in inline_code(text):
        first = span.split()[0]
        if first in subcommands() and " -" in span:
            found.append((first, f"moekit {span}"))
        elif re.match(r"^--?[A-Za-z]", span):
            found.append(("", f"moekit {span}"))
    return found


# Flags of the repository's scripts that pages name in prose, and the script that has each.
SCRIPT_FLAGS = {"--until-stage": "scripts/train_reference.py"}


def wrong_inline_flags(text: str) -> list[str]:
    every = set(options(None)).union(*(options(sub) for sub in subcommands()), SCRIPT_FLAGS)
    wrong = []
    for sub, command in inline_flags(text):
        if sub:
            wrong += [f"`{command}`: {w}" for w in wrong_flags(command)]
        else:
            wrong += [f"`{command[7:]}`: no command has {f}" for f in flags(f"moekit x {command[7:]}")[1] if f not in every]
    return wrong


# ---------------------------------------------------------------------------- links


LINK = re.compile(r"!?\[(?:[^\]\n]|\n(?!\n))*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    return frozenset(slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(page.read_text()), re.MULTILINE))


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {_name(file)}")
    return broken


# ---------------------------------------------------------------------------- Python names


def _module_file(dotted: str) -> Path | None:
    base = SRC.parent.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@cache
def defined(dotted_module: str) -> frozenset[str]:
    """The names a module's source defines at its top level (in `if TYPE_CHECKING:` and
    `try:` blocks too), and its submodules."""
    path = _module_file(dotted_module)
    names: set[str] = set()
    if path.name == "__init__.py":
        names |= {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
    if dotted_module == "moekit":
        import moekit  # lazy: resolves names without importing torch

        names |= set(dir(moekit))
    statements = list(ast.parse(path.read_text()).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.If, ast.Try)):
            statements += node.body + getattr(node, "orelse", []) + [s for h in getattr(node, "handlers", []) for s in h.body]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return frozenset(names)


def missing_name(dotted: str) -> str | None:
    """None when `moekit.a.b.name` exists: the longest prefix that is a module, then one
    name it defines (what follows is an attribute of that object, not checked)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if _module_file(module) is not None:
            if cut == len(parts) or parts[cut] in defined(module):
                return None
            return f"{dotted}: {module} has no {parts[cut]!r}"
    return f"{dotted}: no such module"


DOTTED = re.compile(r"^moekit(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = (".json", ".safetensors", ".yaml", ".md", ".py", ".html", ".png")


def python_names(text: str) -> list[str]:
    """`moekit.x.y` names of a page: inline code that is such a name (a call may follow),
    and in Python blocks every `from moekit... import` and every `moekit.x.y` attribute."""
    names = []
    for span in inline_code(text):
        match = DOTTED.match(span)
        if match and not span.endswith(FILE_SUFFIXES) and not match.group().endswith(FILE_SUFFIXES):
            names.append(match.group())
    for language, body in blocks(text):
        if language != "python":
            continue
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moekit":
                names += [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names += [a.name for a in node.names if a.name.startswith("moekit.")]
            elif isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "moekit":
                    names.append(".".join(["moekit", *reversed(chain)]))
    return names


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_command_shown_exists_with_its_flags(page):
    commands = shell_commands(page.read_text())
    wrong = [f"`{c}`: {w}" for c in commands for w in wrong_flags(c)]
    assert wrong == [], f"{_name(page)} shows commands the CLI does not have:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_flag_named_in_prose_exists(page):
    assert wrong_inline_flags(page.read_text()) == []


def test_the_script_flags_the_pages_name_are_the_scripts():
    for flag, script in SCRIPT_FLAGS.items():
        assert f'"{flag}"' in (ROOT / script).read_text(), (flag, script)


def test_the_pages_show_commands():
    """The reader finds commands where the guides are: a parser that found none would pass."""
    shown = {page.name: len(shell_commands(page.read_text())) for page in PAGES}
    assert shown["README.md"] >= 20 and shown["commands.md"] >= 10 and sum(shown.values()) >= 80, shown
    subs = {flags(c)[0] for page in PAGES for c in shell_commands(page.read_text())}
    assert subcommands() <= subs, f"never shown: {sorted(subcommands() - subs)}"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "BENCHMARKS.md"], ids=_name)
def test_every_relative_link_leads_somewhere(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_python_name_shown_exists(page):
    missing = [m for name in python_names(page.read_text()) if (m := missing_name(name))]
    assert missing == []


def test_every_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    assert [_name(p) for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_architecture_section_lists_the_floors_the_layering_test_enforces():
    from tests.test_layering import ARCH_MAY_IMPORT, FLOORS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture\n"):]
    section = section[: section.index("\n## ")]
    listed = [set(re.findall(r"`([\w.]+)`", item.split(" — ")[0]))
              for item in re.findall(r"^\d+\. (.+)$", section, re.MULTILINE)]
    assert [{"__init__" if u == "moekit" else u for u in floor} for floor in listed] == FLOORS
    arch = next(item for item in re.findall(r"^\d+\. (.+)$", section, re.MULTILINE) if item.startswith("`arch`"))
    assert f"imports only {' and '.join(f'`{u}`' for u in sorted(ARCH_MAY_IMPORT))}" in arch
    assert "tests/test_layering.py" in section and "lazy" in section


# ---------------------------------------------------------------------------- the checks can fail


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A made-up flag, a sub-command that is not one, a link to nowhere, a heading that
    is not there, a Python name that is not there: each is found; real ones are not."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\nmoekit compress --recipe prune-50 --no-such-flag -o OUT\n"
                    "torchrun --nproc-per-node 2 -m moekit shrink -o OUT\n```\n\n"
                    "Run `moekit run --prompt hi --no-prefetch`, `moekit --version`, `moekit eval --speed-run 3`.\n"
                    "Use `--activation-budget 2GiB` or `--activation-bugdet`, `compress --resume`, `train --resume`.\n"
                    "See [this](missing.md), [that](page.md#title), [there](page.md#nowhere).\n"
                    "Call `moekit.offload(model)` or `moekit.eval.speed.measure_spead`.\n\n"
                    "```python\nfrom moekit.data.tokens import tokenizer_for\nmoekit.io.load.load('x')\n```\n")
    text = page.read_text()
    wrong = {c: wrong_flags(c) for c in shell_commands(text)}
    assert wrong == {
        "moekit compress --recipe prune-50 --no-such-flag -o OUT": ["--no-such-flag is not an option of `moekit compress`"],
        "moekit shrink -o OUT": [f"no sub-command 'shrink' (there are: {', '.join(sorted(subcommands()))})"],
        "moekit run --prompt hi --no-prefetch": [],
        "moekit --version": [],
        "moekit eval --speed-run 3": ["--speed-run is not an option of `moekit eval`"],
    }
    assert wrong_inline_flags(text) == ["`--activation-bugdet`: no command has --activation-bugdet",
                                        "`moekit train --resume`: --resume is not an option of `moekit train`"]
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "page.md#nowhere"]
    assert [m for n in python_names(text) if (m := missing_name(n))] == [
        "moekit.eval.speed.measure_spead: moekit.eval.speed has no 'measure_spead'",
        "moekit.data.tokens.tokenizer_for: moekit.data.tokens has no 'tokenizer_for'",
    ]
