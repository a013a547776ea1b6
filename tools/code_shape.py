"""The shape of the library's code: its longest functions and its largest parameter lists (an AST count).

    python tools/code_shape.py [ROOT] [--top N]

ROOT is a checkout (default: this one). Prints the N longest functions of ``ROOT/m2snet`` in lines
(``def`` to the last line of the body, decorators excluded) and the N largest parameter lists of
``ROOT/m2snet`` outside ``m2snet/cli/`` (every parameter but ``self``/``cls``; ``*args``/``**kw``
count one each; typer commands are option lists, hence the CLI's exclusion), each with file:line.
Compare two commits by running it on a second worktree (``git worktree add /tmp/base <commit>``).
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Function:
    where: str  # path:line relative to the root
    name: str  # qualified: Class.method, outer.<locals>.inner
    lines: int
    params: int


def _n_params(args: ast.arguments) -> int:
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    extra = (args.vararg is not None) + (args.kwarg is not None)
    return len([n for n in names if n not in ("self", "cls")]) + extra


def functions(root: Path, package: str = "m2snet") -> Iterator[Function]:
    """Every function and method under ``root/package``."""
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        yield from _walk(tree, rel, prefix="")


def _walk(node: ast.AST, rel: str, prefix: str) -> Iterator[Function]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            yield Function(f"{rel}:{child.lineno}", name, child.end_lineno - child.lineno + 1, _n_params(child.args))
            yield from _walk(child, rel, name + ".<locals>.")
        elif isinstance(child, ast.ClassDef):
            yield from _walk(child, rel, prefix + child.name + ".")
        else:
            yield from _walk(child, rel, prefix)


def report(root: Path, top: int) -> str:
    found = list(functions(root))
    longest = sorted(found, key=lambda f: (-f.lines, f.where))[:top]
    outside_cli = [f for f in found if not f.where.startswith("m2snet/cli/")]
    widest = sorted(outside_cli, key=lambda f: (-f.params, f.where))[:top]
    out = [f"{len(found)} functions in {root / 'm2snet'}", "", f"longest {top} (lines):"]
    out += [f"  {f.lines:4d}  {f.name}  {f.where}" for f in longest]
    out += ["", f"largest {top} parameter lists outside m2snet/cli/ (parameters):"]
    out += [f"  {f.params:4d}  {f.name}  {f.where}" for f in widest]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    print(report(Path(args.root), args.top))


if __name__ == "__main__":
    main()
