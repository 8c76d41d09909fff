"""Sphinx configuration for the peerkit documentation.

Build with ``nox -s docs`` or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docutils.nodes import Element, TextElement
    from sphinx.addnodes import pending_xref
    from sphinx.application import Sphinx
    from sphinx.domains import Domain
    from sphinx.environment import BuildEnvironment

# Document the package from this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "peerkit"
author = "peerkit developers"
copyright = "peerkit developers"

extensions = [
    "sphinx.ext.autodoc",
    # No intersphinx: the build must work without network access. No napoleon: peerkit's
    # docstrings are plain reStructuredText (napoleon took the first "words: more words"
    # line of a property's docstring for its type).
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Type hints in the signatures, one parameter a line when a signature is long.
autodoc_typehints = "signature"
python_maximum_signature_line_length = 90
autodoc_member_order = "bysource"
autodoc_default_options = {
    "show-inheritance": True,
}
# Every cross-reference to a peerkit name must resolve: a page or docstring that names a
# public peerkit object the reference does not document fails the build (with -W). See
# setup() below for the names that are let through.
nitpicky = True

html_theme = "alabaster"
html_title = "peerkit"
# Sphinx's bundled theme, wider than its default (940 px) so that 100-character lines of code
# fit; _static/peerkit.css makes long lines scroll or wrap instead of being cut off.
html_theme_options = {
    "page_width": "1280px",
    "sidebar_width": "230px",
    "body_max_width": "none",
    "fixed_sidebar": True,
    "show_relbar_bottom": True,
}
html_static_path = ["_static"]
html_css_files = ["peerkit.css"]


# ------------------------------------------------------------------ cross-references
# Docstrings name other peerkit objects briefly (``:class:`DecodeError```, written in the
# module that defines the object's home); the reference documents most names where users
# import them (``peerkit.DecodeError``), so a short name is looked up, when the usual rules
# find nothing, as the one documented object whose name ends with it. A reference that still
# finds nothing is an error if it names a public peerkit object, and let through if it names
# something else: the standard library and trio (no intersphinx: the build must work offline),
# peerkit's internal modules and private names, type variables.


def _resolve_short_name(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: TextElement
) -> Element | None:
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or "." in target or target.startswith("_"):
        return None
    node["refspecific"] = True  # "any object whose name ends with .target"
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node.get("refdoc", ""), app.builder, node["reftype"], target, node, contnode
    )


def _is_public_peerkit_name(target: str) -> bool:
    if target.startswith("peerkit"):
        parts = target.split(".")
        if any(part.startswith("_") for part in parts):
            return False  # internal module or private name
        return not (len(parts[-1]) == 1 and parts[-1].isupper())  # a type variable
    if "." in target or target.startswith("_"):
        return False  # another package's, or private
    import peerkit  # a short name: is it one of peerkit's public names?

    modules = [peerkit, *(m for n, m in sys.modules.items() if n.startswith("peerkit."))]
    return any(
        target in getattr(m, "__all__", ()) for m in modules if m.__name__.split(".")[-1][0] != "_"
    )


def _warn_missing(app: Sphinx, domain: Domain, node: pending_xref) -> bool | None:
    if domain.name == "py" and not _is_public_peerkit_name(node.get("reftarget", "")):
        return True  # not peerkit's to document: no warning
    return None


def _public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list[type]) -> None:
    """Show only public base classes (``Peer``'s are ``StateMachine``, not the internal
    ``OwnNursery``)."""
    bases[:] = [b for b in bases if not any(p.startswith("_") for p in b.__module__.split("."))]


def setup(app: Sphinx) -> None:
    app.connect("missing-reference", _resolve_short_name)
    app.connect("warn-missing-reference", _warn_missing)
    app.connect("autodoc-process-bases", _public_bases)
