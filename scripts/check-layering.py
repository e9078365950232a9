#!/usr/bin/env python3
"""The crate's layering (run by .ci/run): no import cycle between the modules of src/, and
the layers depend only downwards:

    error <- dense <- core, stiefel <- cpu, metrics, etf, head <- gpu
    error <- runtime <- kernels <- gpu
    error, runtime <- collective <- cpu, gpu (the data-parallel all-reduce; its thread
    implementation needs no device, so the CPU head alone still builds without `runtime`)
    core, cpu, gpu, runtime <- candle (the candle adapter, on top of both heads)

`runtime` knows nothing of the head (it may use only `error`), `core` and `stiefel` nothing of
either backend. Reads the `crate::` and `super::` paths of every file (comments and strings
removed), so it sees `use` lines and fully qualified paths alike. Prints the module graph's
layers and exits non-zero on a violation.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
# What each top-level module may depend on (besides itself).
ALLOWED = {
    "error": set(),
    "dense": {"error"},
    "core": {"error", "stiefel"},
    "stiefel": {"error", "dense"},
    "cpu": {"error", "core", "stiefel", "dense", "collective"},
    "collective": {"error", "runtime"},
    "metrics": {"error", "core"},
    "etf": {"error", "core", "stiefel", "cpu", "dense"},
    "head": {"error", "core", "cpu", "gpu", "runtime"},
    "runtime": {"error"},
    "kernels": {"error", "runtime"},
    "gpu": {"error", "core", "stiefel", "cpu", "runtime", "kernels", "dense", "collective"},
    "candle": {"error", "core", "cpu", "gpu", "runtime"},
    "lib": None,  # the crate root re-exports everything
}


def strip(src):
    src = re.sub(r"//[^\n]*", "", src)
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r'"(\\.|[^"\\])*"', '""', src)


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel  # e.g. ['gpu', 'stats'], ['lib']


files = []
for root, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            files.append(os.path.join(root, n))

mods = {tuple(module_of(f)): f for f in files}
edges = {m: set() for m in mods}

# Names the crate root re-exports (`pub use cpu::head::CpuHead;`, `pub use a::{B, C};`), so
# that `crate::CpuHead` counts as a use of `cpu::head`.
ROOT = {}
lib = strip(open(os.path.join(SRC, "lib.rs")).read())
for m in re.finditer(r"pub use (?:crate::)?([\w:]+?)(?:::\{([^}]*)\}|::(\w+))\s*;", lib):
    path = m.group(1).split("::")
    names = [n.strip() for n in (m.group(2) or m.group(3)).split(",") if n.strip()]
    for n in names:
        ROOT[n.split(" as ")[-1].strip()] = path


def resolve(parts):
    """The longest known module prefix of a path (root re-exports resolved)."""
    if parts and parts[0] in ROOT:
        parts = ROOT[parts[0]] + parts[1:]
    for i in range(len(parts), 0, -1):
        if tuple(parts[:i]) in mods:
            return tuple(parts[:i])
    return None


for m, f in mods.items():
    src = strip(open(f).read())
    # The module's own path for `super::` (a file module's parent is its folder).
    here = list(m)
    for match in re.finditer(r"\b(crate|super)((?:::\w+)+|::\{[^}]*\})", src):
        head, rest = match.group(1), match.group(2)
        base = [] if head == "crate" else here[:-1]
        tails = []
        if rest.startswith("::{"):
            for item in rest[3:-1].split(","):
                tails.append([t for t in item.strip().split("::") if t and t != "self"])
        else:
            tails.append([t for t in rest.split("::") if t])
        for t in tails:
            target = resolve(base + t)
            if target and target != m and target != tuple(m[:len(target)]):
                edges[m].add(target)

# Tarjan's strongly connected components over the file modules.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        sccs.append(comp)


sys.setrecursionlimit(10000)
for v in mods:
    if v not in index:
        visit(v)

bad = 0
for comp in sccs:
    if len(comp) > 1:
        print("import cycle:", " <-> ".join("::".join(c) for c in sorted(comp)), file=sys.stderr)
        bad = 1
top = {}
for m, targets in edges.items():
    for t in targets:
        a, b = m[0], t[0]
        if a != b:
            top.setdefault(a, set()).add(b)
for a, deps in sorted(top.items()):
    allowed = ALLOWED.get(a, set())
    if allowed is None:
        continue
    extra = deps - allowed
    if extra:
        print(f"layering: `{a}` uses {sorted(extra)}", file=sys.stderr)
        bad = 1
for a in sorted(top):
    if a != "lib":
        print(f"{a:8} -> {', '.join(sorted(top[a]))}")
# Sanity: a parser that silently stopped seeing paths would otherwise "pass".
n_edges = sum(len(e) for e in edges.values())
known = [(("gpu", "head"), ("runtime",)), (("cpu", "head"), ("core", "state")), (("head",), ("cpu", "head"))]
for a, b in known:
    if b not in edges.get(a, set()):
        print(f"layering check is blind: no edge {'::'.join(a)} -> {'::'.join(b)}", file=sys.stderr)
        bad = 1
if n_edges < 100:
    print(f"layering check is blind: only {n_edges} edges", file=sys.stderr)
    bad = 1
print(f"{len(mods)} modules, {n_edges} module edges, "
      f"{'no cycle' if not any(len(c) > 1 for c in sccs) else 'CYCLES'}")
sys.exit(bad)
