#!/usr/bin/env python3
"""Checks the library's layering: every `import` in a target names one of its declared
dependencies (or a system module), and the library targets form a strict stack.

SwiftPM's `--explicit-target-dependency-import-check error` (used by `make build` and
`make test`) already rejects an undeclared import of a Swift target. It does not see C
modules: a C target's module map reaches every target above it, so `import CKernels` in model
code would compile. This script closes that gap by reading the manifest
(`swift package dump-package`) and each source file's imports.

Usage: python3 scripts/check_layers.py [--self-test]
  --self-test  also shows that the check fails on a planted violation (it must be able to fail).
"""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Modules any target may import: the toolchain's and the test framework's.
SYSTEM = {"Foundation", "FoundationEssentials", "Dispatch", "Glibc", "Darwin", "Testing", "XCTest", "Synchronization"}
# The library, bottom to top: each may depend only on targets to its left.
STACK = ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "QuantLabEngine", "QuantLabReport", "QuantLabBench", "QuantLab"]
IMPORT = re.compile(r"^\s*(?:@testable\s+|@_exported\s+|(?:public|package|internal|private|fileprivate)\s+)*import\s+(?:class\s+|struct\s+|enum\s+|func\s+)?([A-Za-z_][A-Za-z0-9_]*)", re.M)


def manifest():
    out = subprocess.run(["swift", "package", "dump-package"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def target_dir(t):
    if t.get("path"):
        return ROOT / t["path"]
    base = {"test": "Tests"}.get(t["type"], "Sources")
    return ROOT / base / t["name"]


def violations(pkg, extra_files=None):
    targets = {t["name"]: t for t in pkg["targets"]}
    found = []
    for name, t in targets.items():
        deps = set()
        for d in t["dependencies"]:
            kind = next(iter(d))
            value = d[kind][0]
            deps.add(value)
        if name in STACK:  # the stack: only targets to the left, never to the right
            for d in deps & set(STACK):
                if STACK.index(d) >= STACK.index(name):
                    found.append(f"Package.swift: {name} depends on {d}, which is not below it in the stack")
        folder = target_dir(t)
        files = sorted(folder.rglob("*.swift")) if folder.is_dir() else []
        files += [f for (tn, f) in (extra_files or []) if tn == name]
        for f in files:
            for m in IMPORT.finditer(f.read_text()):
                mod = m.group(1)
                if mod in SYSTEM or mod in deps:
                    continue
                if mod == "ArgumentParser" and "ArgumentParser" in deps:
                    continue
                if mod in targets:
                    found.append(f"{f.relative_to(ROOT)}: {name} imports {mod} without depending on it (see ARCHITECTURE.md)")
    return found


def main():
    pkg = manifest()
    bad = violations(pkg)
    for b in bad:
        print("✗", b)
    if "--self-test" in sys.argv:
        probe = ROOT / ".build" / "layer_probe.swift"
        probe.parent.mkdir(exist_ok=True)
        probe.write_text("import CKernels\n")
        planted = violations(pkg, extra_files=[("QuantLabModels", probe)])
        probe.unlink()
        if not any("QuantLabModels imports CKernels" in v for v in planted):
            print("✗ self-test: a planted `import CKernels` in QuantLabModels was not caught")
            return 1
        print("✓ self-test: a planted `import CKernels` in QuantLabModels is caught")
    if bad:
        return 1
    print(f"✓ layers: {len(pkg['targets'])} targets, every import declared, library stack {' < '.join(STACK)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
