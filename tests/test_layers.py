"""The package's import walls (docs/architecture.md, "Layers"): every ``megatron_tst`` import in
every module, top-level or inside a function, goes down the layers or stays in its own package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_tst"

# module or package -> what it may import of megatron_tst (besides itself); the order is the
# layering of docs/architecture.md, from the bottom.
ALLOWED = {
    "megatron_tst.mcore": set(),
    "megatron_tst.config": set(),
    "megatron_tst.stop_signals": set(),
    "megatron_tst.tst": set(),
    "megatron_tst.compat": {"megatron_tst.mcore", "megatron_tst.stop_signals"},
    "megatron_tst.data": {"megatron_tst.config", "megatron_tst.tst"},
    "megatron_tst.plan": {"megatron_tst.config", "megatron_tst.data", "megatron_tst.tst"},
    "megatron_tst.models": {"megatron_tst.config", "megatron_tst.plan", "megatron_tst.tst",
                            "megatron_tst.compat"},
    "megatron_tst.training": {"megatron_tst.mcore", "megatron_tst.config", "megatron_tst.compat",
                              "megatron_tst.stop_signals",
                              "megatron_tst.tst", "megatron_tst.data", "megatron_tst.plan",
                              "megatron_tst.models"},
}
APPLICATIONS = ("megatron_tst.export", "megatron_tst.evaluate", "megatron_tst.inspect",
                "megatron_tst.study", "megatron_tst.downstream")
BELOW_APPLICATIONS = set(ALLOWED)
for name in APPLICATIONS:  # the commands' modules: anything below, and export's checkpoint tools
    ALLOWED[name] = BELOW_APPLICATIONS | {"megatron_tst.export"}
ALLOWED["megatron_tst.cli"] = set(ALLOWED) | set(APPLICATIONS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every megatron_tst module ``path`` imports (absolute or relative, anywhere in it)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "megatron_tst" or m.startswith("megatron_tst.")}


def owner(module: str) -> str:
    """The entry of ALLOWED a module belongs to (its package or itself)."""
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return module


def test_every_module_imports_only_down_the_layers():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = owner(module_name(path))
        assert me in ALLOWED or module_name(path) == "megatron_tst", \
            f"{path}: a module outside the layers of docs/architecture.md; add it there and here"
        for target in imported(path):
            them = owner(target)
            if them in (me, "megatron_tst") or them in ALLOWED.get(me, set()):
                continue
            if target in ("megatron_tst", ) or target.startswith(me + "."):
                continue
            problems.append(f"{module_name(path)} imports {target}")
    assert not problems, "imports against the layers of docs/architecture.md:\n" + \
        "\n".join(problems)


def test_nothing_imports_the_cli():
    users = [str(p.relative_to(ROOT)) for d in ("megatron_tst", "benchmarks", "scripts")
             for p in sorted((ROOT / d).rglob("*.py"))
             if p.name != "cli.py" and any(t == "megatron_tst.cli" or t.startswith("megatron_tst.cli.")
                                           for t in imported(p))]
    assert not users, f"these import megatron_tst.cli (use the functions it calls): {users}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walker finds imports inside functions and resolves relative ones (so the walls are
    really checked, not silently passed)."""
    pkg = PACKAGE / "compat" / "__init__.py"
    assert "megatron_tst.mcore" in imported(pkg)  # `from megatron_tst import mcore`
    assert "megatron_tst.compat.cuda_stubs" in imported(pkg)  # `from . import cuda_stubs`
    lazy = imported(PACKAGE / "training" / "distributed.py")
    assert "megatron_tst.compat.apply_cpu_compat" in lazy  # inside init_distributed()
