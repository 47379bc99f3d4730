"""The layers stay layers: the engine and the catalog never load Prefect or rich,
and imports only point downward (engine < catalog < app and flows)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of a package (subpackages too), then reports which top-level
# packages and which stylize layers ended up loaded. A fresh interpreter, so that
# nothing another test imported can hide or fake a load.
_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
modules = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
loaded = {name.split(".")[0] for name in sys.modules}
layers = {".".join(name.split(".")[:2]) for name in sys.modules if name.startswith("stylize.")}
print(json.dumps({"modules": modules, "loaded": sorted(loaded), "layers": sorted(layers)}))
"""


def _import_all(package: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", ["stylize.engine", "stylize.catalog"])
def test_engine_and_catalog_load_neither_prefect_nor_rich(package):
    found = _import_all(package)
    assert len(found["modules"]) >= 4, f"expected {package} to have its modules, found {found['modules']}"
    assert not {"prefect", "rich"} & set(found["loaded"]), (
        f"importing every module of {package} loaded {sorted({'prefect', 'rich'} & set(found['loaded']))}"
    )
    assert "flows" not in found["loaded"], f"{package} imports the flows package"


def test_imports_point_downward():
    engine = _import_all("stylize.engine")["layers"]
    assert "stylize.catalog" not in engine and "stylize.app" not in engine, f"the engine imports {engine}"
    catalog = _import_all("stylize.catalog")["layers"]
    assert "stylize.app" not in catalog, f"the catalog imports {catalog}"



def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module that ``path`` imports, at the top or inside a function, as an absolute name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.add(f"{package}.{base}".rstrip(".") if node.level else base)
    return names


def test_flows_dask_does_not_import_the_catalog_flow():
    imported = _imported_modules(ROOT / "flows" / "dask.py", "flows")
    assert "flows.catalog" not in imported, (
        "flows/dask.py imports flows.catalog, which imports flows.dask: an import cycle; "
        "the flow belongs in flows/catalog.py, the Dask runner in flows/dask.py"
    )


def test_help_loads_neither_torch_nor_prefect():
    # `stylize --help` and a mistyped flag answer at once: the flags come from Settings,
    # which names VGG19's layers without loading the network.
    probe = ("import sys, runpy; sys.argv = ['stylize', '--help']\n"
             "try:\n    runpy.run_module('stylize.app.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted({'torch', 'prefect'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "usage: stylize" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
