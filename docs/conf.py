"""Sphinx configuration for the peerkit documentation.

Build with ``nox -s docs`` or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Document the package from this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "peerkit"
author = "peerkit developers"
copyright = "peerkit developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    # No intersphinx: the build must work without network access.
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Type hints go into the parameter descriptions; an unresolvable hint is not an error.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "show-inheritance": True,
}
nitpicky = False
# The public names are documented twice: where users import them (``peerkit.Peer``) and in
# their home module (``peerkit.peer.Peer``). A short reference such as ``Raises:
# NotConnectedException`` then matches both; either target is correct, so that ambiguity
# warning ("more than one target found for cross-reference") is not an error.
suppress_warnings = ["ref.python"]

napoleon_google_docstring = True
napoleon_numpy_docstring = True

html_theme = "alabaster"
html_title = "peerkit"
