"""Loads files of scripts/ as modules: they import each other by bare name (bench_common), and one of them
(profile.py) shares its name with a standard-library module, so each is loaded under a `script_` prefix."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))

    def load(name: str) -> types.ModuleType:
        module_name = f"script_{name}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        return sys.modules[module_name]

    return load
