"""Every method class in a stage package is registered by ``import kvlab`` alone.

A method file whose import is missing from its stage's ``__init__.py`` would otherwise only
surface as "unknown method" to a user. The method classes are found by reading the stage
packages' source (ast: a ``@dataclass`` class body that sets a ``name`` ClassVar), and the
registry is asked in a fresh interpreter that imports nothing but ``kvlab`` (in this test
process other tests may already have imported every method module directly).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import kvlab
import kvlab.registry

ROOT = Path(__file__).resolve().parents[1]
STAGE_PACKAGES = ("position", "prefill", "compress", "quantize", "retrieve", "reuse")
NOT_REGISTERED = {
    ("kvlab.position.base", "TrainedRope"): "the model's own RoPE: the default when a recipe has "
    "no position method (TRAINED_ROPE), not a method a recipe names",
    ("kvlab.compress.duo_heads", "AnswerMass"): "DuoAttention's identification probe, run by "
    "duo_attention itself, never named in a recipe",
    ("kvlab.retrieve.lychee", "ReuseRecall"): "LycheeDecode's head calibration probe, run by "
    "lychee itself, never named in a recipe",
}


def method_classes() -> dict[str, tuple[str, str]]:
    """``name`` -> (module, class) of every dataclass in a stage package's files that sets a
    ``name: ClassVar[str] = "..."``."""
    found: dict[str, tuple[str, str]] = {}
    for stage in STAGE_PACKAGES:
        for path in sorted((ROOT / "kvlab" / stage).glob("*.py")):
            module = f"kvlab.{stage}.{path.stem}"
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef) or not is_dataclass(node):
                    continue
                name = class_var_name(node)
                if name is None or (module, node.name) in NOT_REGISTERED:
                    continue
                assert name not in found, f"{name!r} set by {found[name]} and {module}.{node.name}"
                found[name] = (module, node.name)
    return found


def is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        ):
            return True
    return False


def class_var_name(node: ast.ClassDef) -> str | None:
    for item in node.body:
        if (
            isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            and item.target.id == "name" and "ClassVar" in ast.unparse(item.annotation)
            and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str)
        ):
            return item.value.value
    return None


REGISTRY_PROBE = """
import json, sys
import kvlab
from kvlab.errors import RecipeError
from kvlab.registry import method_class
names = json.loads(sys.argv[1])
out = {}
for name in names:
    try:
        cls = method_class(name)
    except RecipeError as error:
        out[name] = str(error)
    else:
        out[name] = [cls.__module__, cls.__qualname__, cls.stage]
print(json.dumps({"classes": out, "listed": [m.name for m in kvlab.methods()]}))
"""


def test_every_method_class_in_a_stage_package_is_registered_by_import_kvlab():
    found = method_classes()
    assert len(found) >= 20 and {"quest", "snapkv", "kivi", "ashape", "yarn"} <= set(found)
    probe = subprocess.run(
        [sys.executable, "-c", REGISTRY_PROBE, json.dumps(sorted(found))],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    answer = json.loads(probe.stdout.strip().splitlines()[-1])
    missing = {
        name: f"{module}.{cls}: {answer['classes'][name]}"
        for name, (module, cls) in found.items()
        if answer["classes"][name] != [module, cls, module.split(".")[1]]
    }
    assert not missing, f"not reachable by name after `import kvlab` (a missing import?): {missing}"
    # and nothing is registered that is not a method class of a stage package
    assert sorted(answer["listed"]) == sorted(["full", *found])


def test_the_exceptions_exist_and_are_not_registered():
    import importlib

    for (module, cls), _why in NOT_REGISTERED.items():
        assert hasattr(importlib.import_module(module), cls)
        assert getattr(importlib.import_module(module), cls) not in {
            kvlab.registry.method_class(m.name) for m in kvlab.methods()[1:]
        }


def test_the_source_walk_finds_a_class_left_out_of_the_stage_imports(tmp_path, monkeypatch):
    """The walk reads files, not the registry: a new method file is found even unimported."""
    package = tmp_path / "kvlab" / "compress"
    package.mkdir(parents=True)
    (package / "forgotten.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n"
        "from kvlab.compress.base import CompressMethod\n\n"
        "@dataclass(frozen=True)\nclass Forgotten(CompressMethod):\n"
        "    name: ClassVar[str] = 'forgotten'\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert method_classes() == {"forgotten": ("kvlab.compress.forgotten", "Forgotten")}
