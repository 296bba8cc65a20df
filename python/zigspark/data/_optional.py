"""Optional packages the data sources need, imported only when a source uses them.

The GPU machine has neither scikit-learn nor scikit-image (and perhaps no NumPy or Pillow), so
`import zigspark.data` must not import them; a function that needs one raises ImportError naming the
`pip install` that fixes it.
"""

from __future__ import annotations

import importlib

# import name -> distribution to pip install
_PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "PIL": "pillow", "numpy": "numpy"}


def require(module: str, needed_for: str):
    """Import `module` (e.g. "sklearn.datasets") or raise ImportError saying which pip install fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        pip_name = _PIP_NAMES.get(top, top)
        raise ImportError(f"{needed_for} needs the package {pip_name!r}, which is not installed here; "
                          f"install it with `pip install {pip_name}`") from err
