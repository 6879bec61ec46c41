"""Copy a tower's source files into an export folder, flattened, with their package imports rewritten.

transformers' remote code lives in one flat folder and follows only `from .name import ...` lines to find the files
it copies (`dynamic_module_utils.get_relative_imports`). So every defocus_clip module the tower needs (found by
following its imports, including those inside functions) is written as `defocus_<subpackage>_<module>.py`, and every
import of a defocus_clip module is rewritten to a flat relative import. `defocus_bundle.py` imports each bundled
module once (so transformers copies them all) and maps the tower's import path to its class.

The files are the package's own sources at export time: no second implementation of any tower exists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

from ..errors import DefocusError

PACKAGE = "defocus_clip"
BUNDLE_MODULE = "defocus_bundle"


def flat_name(module: str) -> str:
    """`defocus_clip.towers.mamba` -> `defocus_towers_mamba`."""
    return "defocus_" + module.removeprefix(PACKAGE + ".").replace(".", "_")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # parent is not a package
        return False


def _resolve_base(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """Absolute module named by a `from X import ...` node, or None when X is outside defocus_clip."""
    if node.level == 0:
        if node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
            return node.module
        return None
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _rewrite(source: str, module: str, is_package: bool, path: Path) -> tuple[str, set[str]]:
    """Source with package imports rewritten to flat relative imports, and the package modules it needs."""
    tree = ast.parse(source)
    edits: list[tuple[int, int, int, int, str]] = []
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name.split(".")[0] == PACKAGE for a in node.names):
                raise DefocusError(
                    f"{path}:{node.lineno}: `import {PACKAGE}...` cannot be bundled into an export folder; "
                    "use a relative import (`from ..layers import scan`)"
                )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        base = _resolve_base(node, module, is_package)
        if base is None:
            continue
        if base == PACKAGE and not is_package:
            raise DefocusError(
                f"{path}:{node.lineno}: a tower module importing from the package root ({PACKAGE}) would pull the "
                "whole package into the export; import from the submodule instead"
            )
        statements, names = [], []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and _is_module(sub):  # `from . import scan_cpu`: a submodule
                statements.append(f"from . import {flat_name(sub)} as {alias.asname or alias.name}")
                deps.add(sub)
            else:
                names.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
        if names:
            statements.insert(0, f"from .{flat_name(base)} import {', '.join(names)}")
            deps.add(base)
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, "; ".join(statements)))
    lines = source.splitlines(keepends=True)
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        first, last = lines[lineno - 1], lines[end_lineno - 1]
        lines[lineno - 1 : end_lineno] = [first[:col] + text + last[end_col:]]
    return "".join(lines), deps


def bundle_tower_sources(tower_class: type, out_dir: str | Path) -> list[str]:
    """Write the flattened sources of `tower_class` and `defocus_bundle.py` into `out_dir`; returns file names."""
    import defocus_clip

    out_dir = Path(out_dir)
    start = tower_class.__module__
    if not start.startswith(PACKAGE + "."):
        raise DefocusError(f"tower class {tower_class.__qualname__} is not part of {PACKAGE} ({start})")
    sources: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        if module in sources:
            continue
        path = Path(inspect.getfile(importlib.import_module(module)))
        text, deps = _rewrite(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", path)
        rel = path.relative_to(Path(defocus_clip.__file__).parent)
        header = (f"# {PACKAGE} {defocus_clip.__version__}: {PACKAGE}/{rel.as_posix()}, bundled by "
                  "`defocus-clip export` with its package imports made flat and relative. Generated: do not edit.\n")
        sources[module] = header + text
        todo.extend(sorted(deps - sources.keys()))
    written = []
    for module, text in sorted(sources.items()):
        (out_dir / f"{flat_name(module)}.py").write_text(text, encoding="utf-8")
        written.append(f"{flat_name(module)}.py")
    class_path = f"{start}.{tower_class.__qualname__}"
    lines = [
        f'"""Tower sources bundled by `defocus-clip export` ({PACKAGE} {defocus_clip.__version__}), so this folder',
        'loads with `trust_remote_code=True` where defocus_clip is not installed. Generated: do not edit."""',
        "",
        "# every bundled module, each on a `from .x import` line: transformers copies the files named this way",
        *(f"from .{flat_name(m)} import __name__ as _m{i}  # noqa: F401" for i, m in enumerate(sorted(sources))),
        f"from .{flat_name(start)} import {tower_class.__qualname__}",
        "",
        f"TOWER_CLASSES = {{{class_path!r}: {tower_class.__qualname__}}}",
        "",
    ]
    (out_dir / f"{BUNDLE_MODULE}.py").write_text("\n".join(lines), encoding="utf-8")
    return [*written, f"{BUNDLE_MODULE}.py"]
