"""No import cycles anywhere in BrainAnomalyLib, counting a package's __init__ as a module of its own.

`lint-imports` (pyproject.toml) checks the layers and cycles between siblings; it does not look at a module that
imports its own package's __init__ while that __init__ imports the module (`from . import build_net` inside a net
class, say). This test does, over the same import graph (grimp, import-linter's own graph builder), imports inside
functions included.
"""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (requirements.txt)")

# The CLI's subcommands borrow cli.main's progress bar while cli.main registers them; this goes with the CLI split
# into one module per subcommand (helper "detect"), and this entry with it.
PENDING: set = set()


def strongly_connected(graph) -> set:
    """Groups of two or more modules that import each other, directly or through others (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index, low, on_stack, stack, groups = {}, {}, set(), [], set()
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            for j in range(i, len(edges[node])):
                nxt = edges[node][j]
                if nxt not in index:
                    work += [(node, j + 1), (nxt, 0)]
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.add(frozenset(group))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return groups


def test_no_import_cycles():
    graph = grimp.build_graph("BrainAnomalyLib", include_external_packages=False)
    found = strongly_connected(graph)
    assert found == PENDING, "import cycles: " + "; ".join(" <-> ".join(sorted(g)) for g in found - PENDING)


def test_the_check_sees_a_cycle_through_a_package_init():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "other"):
        graph.add_module(module)
    graph.add_import(importer="pkg", imported="pkg.a")
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="other", imported="pkg.a")
    assert strongly_connected(graph) == set()
    graph.add_import(importer="pkg.b", imported="pkg")  # `from . import x` in a module the __init__ imports
    assert strongly_connected(graph) == {frozenset({"pkg", "pkg.a", "pkg.b"})}
