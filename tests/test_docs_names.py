"""The documentation names only what exists, where it exists.

* Every dotted path a page gives (``:class:`~peerkit.config_messages.PeerSetParamQuery```,
  ````peerkit.launch.current_run_dir````, ``from peerkit.testing import ...``, ``python -m
  peerkit.bench``) imports.
* Every public peerkit name a page uses in code or in a literal (````OkMsg````,
  ``ConfigSnapshotQuery()`` in an example) comes with its import path somewhere on the page:
  a reference, an import or a dotted literal. A reader never has to guess where it lives.
* The API reference (``docs/api.rst``, with the reference sections of the other pages)
  documents every name of every public module's ``__all__``, and the methods and properties
  users call on the main classes under those classes.

The docs build itself (``nox -s docs``: nitpicky, warnings are errors) checks that every
cross-reference finds its documentation.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import peerkit

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.rst"))

#: Where a page of another owner is known to be wrong: (page, name) -> why. Each entry is
#: a reported bug to fix in that page, not a rule.
KNOWN_WRONG: dict[tuple[str, str], str] = {}

#: The classes whose public methods and properties the reference must list under them.
MAIN_CLASSES = [
    "peerkit.Peer",
    "peerkit.ConfiguredPeer",
    "peerkit.ConfigServer",
    "peerkit.Broker",
    "peerkit.launch.Launcher",
    "peerkit.sync.SyncPeer",
    "peerkit.sync.SyncBroker",
]
#: members of the main classes users do not call (documented elsewhere, or not at all)
NOT_CALLED: set[str] = set()


# ----------------------------------------------------------------------------- helpers


def public_modules() -> list[ModuleType]:
    modules = [peerkit]
    for info in pkgutil.iter_modules(peerkit.__path__):
        if not info.name.startswith("_"):
            modules.append(importlib.import_module(f"peerkit.{info.name}"))
    return modules


def public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    ]


def resolve(path: str) -> object:
    """The object a dotted path names: its longest importable module prefix, then
    attributes. Raises ImportError or AttributeError."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def page_text(page: Path) -> str:
    """The page, with the files it ``literalinclude``-s appended (the reader sees them)."""
    text = page.read_text()
    for name in re.findall(r"^\.\. literalinclude:: (\S+)", text, re.MULTILINE):
        text += "\n\n" + (page.parent / name).read_text()
    return text


#: languages of blocks that show what a program printed, not code to write
OUTPUT_BLOCKS = ("console", "text")


def code_and_literals(text: str) -> Iterator[str]:
    """The double-backquoted literals, role targets and code blocks of a page (not the
    blocks that show a program's output)."""
    yield from re.findall(r"``(.+?)``", text, re.DOTALL)
    yield from re.findall(r":[a-z]+:`([^`]+)`", text)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        directive = stripped.startswith(".. ")
        if (stripped.endswith("::") and not directive) or stripped.startswith(".. code-block::"):
            language = stripped.removeprefix(".. code-block::").strip()
            indent = len(line) - len(line.lstrip())
            block = []
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i])
                i += 1
            if language not in OUTPUT_BLOCKS:
                yield "\n".join(block)
        else:
            i += 1


def imports(text: str) -> Iterator[tuple[str, str]]:
    """(module, name) of every ``from peerkit... import name`` on the page."""
    joined = re.sub(r"import \(([^)]*)\)", lambda m: "import " + " ".join(m.group(1).split()), text)
    for module, names in re.findall(r"from (peerkit[\w.]*) import ([\w ,]+)", joined):
        for name in names.split(","):
            name = name.split(" as ")[0].strip()
            if name.isidentifier():
                yield module, name


#: Dotted names in the pages that are not Python paths
NOT_PATHS = {"peerkit.json.v2"}  # the JSON subprotocol's name (browser.rst)


def paths(text: str) -> set[str]:
    """Every dotted peerkit path the page gives, imports included (not those in quotes,
    which are strings: a logger's name, a JSON type name)."""
    text = re.sub(r"\"[^\"\n]*\"", "", text)
    found = {
        p.rstrip(".")
        for p in re.findall(r"(?<![\w/-])peerkit(?:\.[A-Za-z_]\w*)+(?![\w*])\.?", text)
    }
    found |= {f"{module}.{name}" for module, name in imports(text)}
    return found - NOT_PATHS


#: public name -> the public modules that export it. The fixtures are left out: a test asks
#: for them by name, nobody imports them.
EXPORTED: dict[str, set[str]] = {}
for _module in public_modules():
    if _module.__name__ != "peerkit.pytest_plugin":
        for _name in public_names(_module):
            EXPORTED.setdefault(_name, set()).add(_module.__name__)
#: Names that need no path: the package's own (``from peerkit import Peer``, as the API
#: reference and every example say), and the peer's methods and predicates
#: (``peer.is_ready``), which some modules also export as functions.
OBVIOUS = set(peerkit.__all__) | {n for n in dir(peerkit.Peer) if not n.startswith("_")}


def used_names(text: str) -> set[str]:
    """Public peerkit names used in the page's code and literals (CamelCase class names,
    and snake_case functions and constants with an underscore)."""
    words: set[str] = set()
    for chunk in code_and_literals(text):
        words |= set(re.findall(r"(?<![\w.])([A-Z]\w*[a-z]\w*|[a-z]+_\w+|[A-Z]+_[A-Z_]+)\b", chunk))
    defined = set(re.findall(r"(?:class|def) (\w+)", text))
    return {w for w in words if w in EXPORTED and w not in OBVIOUS and w not in defined}


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_gives_imports(page: Path) -> None:
    broken = []
    for path in sorted(paths(page_text(page))):
        try:
            resolve(path)
        except (ImportError, AttributeError) as exc:
            if (page.name, path) not in KNOWN_WRONG:
                broken.append(f"{path} ({type(exc).__name__}: {exc})")
    assert not broken, f"{page.name} names paths that do not import: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_name_a_page_uses_comes_with_its_path(page: Path) -> None:
    text = page_text(page)
    given = paths(text)
    missing = [
        name
        for name in sorted(used_names(text))
        if not any(p == name or p.endswith(f".{name}") for p in given)
        and (page.name, name) not in KNOWN_WRONG
    ]
    assert not missing, (
        f"{page.name} uses {missing} without saying where to import them from: reference "
        "each once (:class:`~peerkit.module.Name`) or show the import"
    )


def own_doc(cls: type, name: str) -> bool:
    """Whether autodoc shows ``cls.name`` when told to document all members: it has a
    docstring of its own."""
    value = cls.__dict__.get(name)
    if isinstance(value, property):
        value = value.fget
    return bool(getattr(value, "__doc__", None))


def documented() -> tuple[set[int], set[str]]:
    """What the pages' autodoc directives document: the objects, and the dotted names of
    class members (``peerkit.Peer.send_message``, under the path the class is documented
    at)."""
    objects: set[int] = set()
    members: set[str] = set()
    for page in PAGES:
        lines = page.read_text().splitlines()
        context: list[tuple[int, str]] = []  # (indent, class path) of enclosing autoclasses
        for i, line in enumerate(lines):
            found = re.match(r"(\s*)\.\. auto(\w+):: (\S+)", line)
            if not found:
                continue
            indent, kind, target = len(found.group(1)), found.group(2), found.group(3)
            context = [(n, c) for n, c in context if n < indent]
            if kind in ("method", "property", "attribute") and context and "." not in target:
                target = f"{context[-1][1]}.{target}"
            options = []
            for following in lines[i + 1 :]:
                if re.match(r"\s*:[\w-]+:", following) or (
                    options
                    and following.startswith(" " * (indent + 4))
                    and following.strip()
                    and not following.strip().startswith(("..", ":"))
                    and options[-1].rstrip().endswith(",")
                ):
                    options.append(following.strip())
                else:
                    break
            listed = re.search(r":members:(.*?)(?= :[\w-]+:|$)", " ".join(options))
            obj = resolve(target)
            objects.add(id(obj))
            if kind in ("method", "property", "attribute"):
                members.add(target)
            if kind == "module" and listed is not None:
                names = [n.strip() for n in listed.group(1).split(",") if n.strip()]
                for name in names or public_names(obj):  # type: ignore[arg-type]
                    value = getattr(obj, name)
                    objects.add(id(value))
                    if isinstance(value, type):  # autodoc documents its members too
                        members |= {
                            f"{target}.{name}.{m}"
                            for m in dir(value)
                            if not m.startswith("_") and own_doc(value, m)
                        }
            if kind in ("class", "exception"):
                context.append((indent, target))
                if listed is not None:
                    names = [n.strip() for n in listed.group(1).split(",") if n.strip()]
                    cls = obj
                    for name in names or [n for n in dir(cls) if not n.startswith("_")]:
                        members.add(f"{target}.{name}")
    return objects, members


def listed_under(cls_path: str, name: str, members: set[str]) -> bool:
    """Whether ``name`` is documented under the class, or under the documented base class
    it comes from (``ConfiguredPeer.send_message`` is ``Peer.send_message``)."""
    if f"{cls_path}.{name}" in members:
        return True
    cls = resolve(cls_path)
    assert isinstance(cls, type)
    inherited = [k for k in cls.__mro__[1:] if getattr(k, name, None) is getattr(cls, name)]
    return any(
        member.endswith(f".{name}") and resolve(member.rsplit(".", 1)[0]) in inherited
        for member in members
    )


def test_the_reference_documents_every_public_name() -> None:
    objects, _ = documented()
    missing = [
        f"{module.__name__}.{name}"
        for module in public_modules()
        for name in public_names(module)
        if id(getattr(module, name)) not in objects
    ]
    assert not missing, f"not in the API reference: {missing}"


@pytest.mark.parametrize("cls_path", MAIN_CLASSES)
def test_the_reference_lists_what_users_call_under_the_class(cls_path: str) -> None:
    _, members = documented()
    cls = resolve(cls_path)
    public = [
        name
        for name in dir(cls)
        if not name.startswith("_") and f"{cls_path}.{name}" not in NOT_CALLED
    ]
    missing = [name for name in public if not listed_under(cls_path, name, members)]
    assert not missing, f"{cls_path}: not listed under the class: {missing}"


def test_the_hooks_are_documented() -> None:
    _, members = documented()
    hooks = [
        "peerkit.Peer._connections_established",
        "peerkit.Peer._start",
        "peerkit.Peer._stop",
        "peerkit.Peer._shutting_down",
        "peerkit.Peer._control_action",
        "peerkit.ConfiguredPeer._dependencies_are_ready",
        "peerkit.ConfiguredPeer._params_changed",
        "peerkit.ConfiguredPeer._dependency_lost",
    ]
    assert [h for h in hooks if h not in members] == []


def test_the_checks_see_what_they_check() -> None:
    """The helpers find what the tests rely on (so that a test cannot pass by seeing
    nothing)."""
    text = (
        "Use ``OkMsg`` and :class:`~peerkit.config_messages.PeerSetParamQuery`::\n\n"
        "    from peerkit.launch import (\n        current_run_dir,\n        Launcher,\n    )\n"
        "    reply = ConfigSnapshotQuery()\n"
    )
    assert used_names(text) == {"OkMsg", "ConfigSnapshotQuery", "current_run_dir", "Launcher"}
    assert {"peerkit.launch.current_run_dir", "peerkit.launch.Launcher"} <= paths(text)
    assert "peerkit.config_messages.PeerSetParamQuery" in paths(text)
    with pytest.raises(AttributeError):
        resolve("peerkit.messages.NoSuchMsg")
    objects, members = documented()
    assert id(peerkit.Peer) in objects and "peerkit.Peer.send_message" in members
