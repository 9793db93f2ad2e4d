"""Sphinx configuration of clusterlearn's documentation (``make docs`` builds it into _build/html)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import apigen  # noqa: E402  (docs/_ext, after the path is set)

import clusterlearn  # noqa: E402

project = "clusterlearn"
author = "the clusterlearn authors"
copyright = "2026, the clusterlearn authors"
release = version = clusterlearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# Broken cross-references are errors (make docs runs sphinx -W); nothing is left unresolved.
nitpicky = True

# The API pages come from the modules' __all__, written before Sphinx reads the sources.
apigen.write_pages(HERE / "api")
autodoc_typehints = "none"  # the numpydoc "Parameters" sections give types, shapes and dtypes
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # a framework method's docstring (nn.Module.forward) is not ours
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = "clusterlearn"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]


def _check_docstrings(app):
    from sphinx.util import logging

    logger = logging.getLogger("clusterlearn.apigen")
    for name in apigen.missing_docstrings():
        logger.warning("public name without a docstring: %s", name)
    for entry in apigen.prose_in_entries():
        logger.warning("a paragraph read as a parameter (put it under a Notes header): %s", entry)


def _resolve_relative(app, env, node, contnode):
    """Link a reference written relative to the defining module to where the object is documented."""
    if node.get("refdomain") != "py":
        return None
    name, exists = apigen.RESOLVER.resolve(node["reftarget"], node.get("py:module"), node.get("py:class"))
    if name is not None:
        domain = env.get_domain("py")
        # the name itself, else its owner (an undocumented dataclass field: link to the class)
        for target in (name, name.rpartition(".")[0]):
            for role in (node["reftype"], "obj"):
                found = domain.resolve_xref(env, node["refdoc"], app.builder, role, target, node, contnode)
                if found is not None:
                    return found
    # An existing object that is not public (a private helper, a framework class): code, no link.
    # A name that names nothing falls through and nitpicky reports it.
    return contnode if exists else None


def setup(app):
    app.connect("builder-inited", _check_docstrings)
    app.connect("missing-reference", _resolve_relative)
