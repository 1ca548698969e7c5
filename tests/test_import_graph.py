"""The layering of docs/design.md, enforced by reading every module's imports with ``ast``.

Arrows point down: errors/atomic_io -> config -> model -> parallel -> checkpoint -> training | convert
-> cli (entry points). ``data`` sits beside the stack: it uses only the bottom layers and is used only by
training, convert and the entry points. Lazy imports inside functions count too. Every ``tools/*.py`` is a
thin CLI: it runs ``main`` of ``megatron_cola/cli/<its name>.py`` and nothing else, and no entry point
imports another module's private ``_names``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_cola"

# Each layer may import only the layers before it (peers in one layer may not import each other).
LAYERS: list[set[str]] = [
    {"errors", "atomic_io"},
    {"config"},
    {"model"},
    {"parallel"},
    {"checkpoint"},
    {"training", "convert"},
    {"cli", "launch"},
]
DATA_MAY_IMPORT = {"errors", "atomic_io", "config"}
DATA_USERS = {"training", "convert", "cli"}
# Tools are thin CLIs over the installed package: none may put the repository on sys.path.
SYS_PATH_ALLOWED: set[str] = set()


def _layer(unit: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    return None


def allowed(src: str, dst: str) -> bool:
    """May top-level unit ``src`` of the package (``training``, ``config``, ...) import unit ``dst``?"""
    if src == dst:
        return True
    if src == "data":
        return dst in DATA_MAY_IMPORT
    if dst == "data":
        return src in DATA_USERS
    src_layer, dst_layer = _layer(src), _layer(dst)
    if src_layer is None or dst_layer is None:
        raise AssertionError(f"megatron_cola.{src if src_layer is None else dst} has no layer in this test")
    return dst_layer < src_layer


def imported_units(source: str, module: str) -> set[str]:
    """Top-level ``megatron_cola`` units imported by ``source`` (dotted name ``module``)."""
    units = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
            if names[0] == "megatron_cola":
                names = [f"megatron_cola.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_cola" and len(parts) > 1:
                units.add(parts[1])
    return units


def violations(source: str, module: str) -> list[str]:
    src = module.split(".")[1]
    return [
        f"{module} imports megatron_cola.{dst}"
        for dst in sorted(imported_units(source, module))
        if not allowed(src, dst)
    ]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            out.append((".".join(parts), path))
    return out


def test_no_module_imports_a_higher_layer() -> None:
    problems = [v for module, path in _modules() for v in violations(path.read_text(), module)]
    assert not problems, "\n".join(problems)


def test_every_unit_has_a_layer() -> None:
    units = {module.split(".")[1] for module, _ in _modules()}
    assert units, "no modules found"
    for unit in units - {"data"}:
        assert _layer(unit) is not None, f"megatron_cola.{unit} is not in LAYERS: place it in docs/design.md"


@pytest.mark.parametrize(
    "module, source",
    [
        ("megatron_cola.convert.x", "from megatron_cola.training.arguments import parse_args"),
        ("megatron_cola.checkpoint.x", "def f():\n    import megatron_cola.training.trainer"),
        ("megatron_cola.checkpoint.x", "from megatron_cola import convert"),
        ("megatron_cola.model.x", "from ..parallel import ParallelState"),
        ("megatron_cola.data.x", "from megatron_cola.model import CoLALlama"),
        ("megatron_cola.training.x", "from megatron_cola.cli import generate"),
    ],
)
def test_checker_reports_upward_imports(module: str, source: str) -> None:
    assert violations(source, module), f"{source!r} in {module} should be refused"


def test_checker_accepts_downward_imports() -> None:
    source = "from megatron_cola.checkpoint import read_latest\nfrom ..config import ModelArgs\n"
    assert violations(source, "megatron_cola.convert.x") == []


def test_tools_do_not_patch_sys_path() -> None:
    scripts = [*sorted((ROOT / "tools").glob("*.py")), ROOT / "pretrain_cola.py"]
    patched = [p.name for p in scripts if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert set(patched) <= SYS_PATH_ALLOWED, patched


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def thin_cli_problems(source: str, name: str) -> list[str]:
    """Why ``tools/{name}.py`` (``source``) is not a thin CLI over ``megatron_cola.cli.{name}``: it may hold
    a docstring, ``import sys``, ``from megatron_cola.cli.{name} import main`` and the ``__main__`` guard."""
    tree = ast.parse(source)
    problems = []
    for node in _imports(tree):
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"]:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == f"megatron_cola.cli.{name}"
            and [a.name for a in node.names] == ["main"]
        ):
            continue
        problems.append(f"tools/{name}.py: line {node.lineno} imports {ast.unparse(node)!r}")
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        problems.append(f"tools/{name}.py: line {node.lineno} holds logic ({type(node).__name__})")
    return problems


def private_imports(source: str) -> list[str]:
    """``from megatron_cola.X import _name`` lines of ``source`` (another module's private names)."""
    return [
        ast.unparse(node)
        for node in _imports(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("megatron_cola")
        and any(a.name.startswith("_") for a in node.names)
    ]


def test_tools_are_thin_clis_over_cli() -> None:
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert tools, "no tools found"
    problems = [p for path in tools for p in thin_cli_problems(path.read_text(), path.stem)]
    missing = [p.stem for p in tools if not (PACKAGE / "cli" / f"{p.stem}.py").exists()]
    problems += [f"tools/{m}.py has no megatron_cola/cli/{m}.py" for m in missing]
    assert not problems, "\n".join(problems)


def test_entry_points_import_no_private_names() -> None:
    scripts = [*sorted((ROOT / "tools").glob("*.py")), *sorted((PACKAGE / "cli").glob("*.py"))]
    scripts += [ROOT / "pretrain_cola.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    found = [f"{p.relative_to(ROOT)}: {line}" for p in scripts for line in private_imports(p.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nimport preprocess_data\nfrom megatron_cola.cli.x import main\n",
        "import sys\nfrom megatron_cola.cli.x import main, helper\n",
        "import sys\nfrom megatron_cola.cli.y import main\n",
        "import sys\nfrom megatron_cola.cli.x import main\n\ndef run():\n    return main()\n",
    ],
)
def test_thin_cli_checker_reports_logic_and_sibling_imports(source: str) -> None:
    assert thin_cli_problems(source, "x"), f"{source!r} should be refused as tools/x.py"
    assert not thin_cli_problems(
        '"""doc"""\nimport sys\n\nfrom megatron_cola.cli.x import main\n\n'
        'if __name__ == "__main__":\n    sys.exit(main())\n',
        "x",
    )
    assert private_imports("from megatron_cola.training.pretrain import _init\n")
    assert not private_imports("from megatron_cola.training.pretrain import init_distributed\n")
