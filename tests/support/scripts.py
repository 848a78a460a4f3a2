"""The scripts of ``simulations/`` as modules, for the tests that drive them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"


def load_script(name: str) -> ModuleType:
    """``simulations/<name>.py``, imported as the module ``simulations_<name>`` (registered
    in ``sys.modules``, where dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"simulations_{name}", SIMULATIONS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
