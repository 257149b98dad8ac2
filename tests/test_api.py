"""The public surface: names, docstrings, stubs."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import is_dataclass
from pathlib import Path

import wspool
import wspool._native as native
import wspool.testing


def test_every_public_name_has_a_docstring():
    missing = []
    for module in (wspool, wspool.testing, wspool.exceptions):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if name.startswith("__"):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                # Dataclass fields are documented in the class docstring.
                fields = {f.name for f in dataclasses.fields(obj)} if is_dataclass(obj) else set()
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or attr in fields:
                        continue
                    if not (getattr(member, "__doc__", None) or "").strip():
                        missing.append(f"{module.__name__}.{name}.{attr}")
    assert missing == []


def test_native_classes_match_the_stub():
    stub = (Path(native.__file__).parent / "_native.pyi").read_text()
    for cls in (native.Job, native.Result, native.Stats, native.NativeStream):
        assert f"class {cls.__name__}:" in stub
        for attr in vars(cls):
            if not attr.startswith("_"):
                assert f"def {attr}(" in stub, f"{cls.__name__}.{attr} missing from the stub"


def test_package_ships_py_typed():
    assert (Path(wspool.__file__).parent / "py.typed").exists()


def test_exception_tree():
    for name in (
        "ConnectError",
        "HandshakeError",
        "ConnectionClosed",
        "ProtocolError",
        "DecodeError",
        "Timeout",
        "InternalError",
    ):
        assert issubclass(getattr(wspool, name), wspool.WspoolError)
    assert issubclass(wspool.WspoolError, Exception)
    assert issubclass(wspool.HandshakeError, wspool.ConnectError)
