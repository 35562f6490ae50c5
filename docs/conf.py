"""Sphinx configuration of kiln's documentation: `sphinx-build -W -b html docs docs/_build/html`.

Pages are Markdown (MyST) except the API reference; the configuration reference is generated from
conf/*.yaml at build time by the local extension in _ext/. Nothing is fetched from the network.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import kiln  # noqa: E402 - the installed package, with its compiled core

# kiln loads its C++ core on first use. Loading every public name here makes a missing or broken
# extension fail the build at once, and puts the names in the module's namespace, where autodoc lists them.
for _name in kiln.__all__:
    getattr(kiln, _name)

project = "kiln"
author = "kiln contributors"
copyright = "kiln contributors"
release = version = kiln.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "kiln_config_reference",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
# Commands and options are quoted as typed: `--multirun` must not become an en dash.
smartquotes = False

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}

html_theme = "alabaster"
html_title = f"kiln {release}"
html_theme_options = {"description": "The AISG MLOps template for image classification, with a C++ core"}
