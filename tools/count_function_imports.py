"""Count function-level imports (Import/ImportFrom nested in a FunctionDef/AsyncFunctionDef).

Lazy imports hide dependencies from a reader (import-linter sees them, a newcomer does not); the
ones kept buy start-up time or avoid an optional dependency (docs/architecture.md, "Layers").

Usage: python tools/count_function_imports.py [ROOT] [--ref GITREF]
  ROOT defaults to m2snet; with --ref the files are read from that commit (git show) instead of the worktree.
Reports a per-file count, the m2snet total excluding m2snet/kubeflow/components and m2snet/kubeflow/pipelines,
and the total including them.
"""
import argparse
import ast
import subprocess
from pathlib import Path

KFP_DIRS = ("m2snet/kubeflow/components/", "m2snet/kubeflow/pipelines/")


def function_level_imports(source: str) -> list[int]:
    """Line numbers of imports that sit anywhere inside a function body (nested classes/functions included)."""
    lines: list[int] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                lines.append(child.lineno)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(ast.parse(source), False)
    return lines


def sources(root: str, ref: str | None) -> dict[str, str]:
    if ref is None:
        return {str(p): p.read_text() for p in sorted(Path(root).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, root], capture_output=True, text=True,
                           check=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{ref}:{n}"], capture_output=True, text=True, check=True).stdout
            for n in sorted(names) if n.endswith(".py")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default="m2snet")
    ap.add_argument("--ref", default=None)
    ap.add_argument("--quiet", action="store_true", help="totals only")
    args = ap.parse_args()
    per_file = {name: len(function_level_imports(src)) for name, src in sources(args.root, args.ref).items()}
    if not args.quiet:
        for name, n in per_file.items():
            if n:
                print(f"{n:4d}  {name}")
    core = sum(n for name, n in per_file.items() if not name.startswith(KFP_DIRS))
    print(f"m2snet (excl. kubeflow/components, kubeflow/pipelines): {core}")
    print(f"m2snet total incl. components and pipelines:            {sum(per_file.values())}")


if __name__ == "__main__":
    main()
