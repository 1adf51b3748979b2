"""The lumos web app (``lumos app``): a Streamlit page on top of plain-Python helpers.

``lumos.app.logic`` holds everything that does not need Streamlit (decoding uploads, predictions, running
methods, downloads, evaluation) so it can be tested directly; ``streamlit_app.py`` is the page itself.
"""

from pathlib import Path

SCRIPT = Path(__file__).with_name("streamlit_app.py")

__all__ = ["SCRIPT"]
