#!/usr/bin/env python3
"""Checks release binaries for a Swift class allocated with two different sizes.

Why: with Swift 6.3's default cross-module optimisation (`-enable-default-cmo`, on in release
builds), a module that inlined another module's class initialiser allocated the object
without the class's *private* stored properties (QuantLabEngine's Int8Plan: 41 of 65 bytes);
the initialiser, compiled in the defining module, then wrote past the allocation. Debug and
AddressSanitizer builds did not show it; release builds of exp05 and exp08 corrupted the heap.

How: every `call swift_allocObject` whose metadata comes straight from a class's metadata
accessor (`call <...CMa>`, then `mov %rax,%rdi` or through one register) and whose size is a
constant (`mov $N,%esi`) is one allocation site of that class with that size. A class with
two sizes across the binaries given is an error. (A class allocated only outside its own
module with a wrong size is not caught: the defining module must allocate it somewhere too,
as an initialiser that is not inlined does.)

Usage: check_class_sizes.py BINARY...   (exit 1 and the classes when some class has two sizes)
"""
import collections
import re
import subprocess
import sys

CALL = re.compile(r"\scall\s+[0-9a-f]+\s+<([^>]+)>")
SIZE = re.compile(r"\smov\s+\$0x([0-9a-f]+),%esi$")
MOV_REG = re.compile(r"\smov\s+%(r\w+),%(r\w+)$")


def allocation_sites(binary):
    """(class metadata accessor, size, function) for each recognised allocation site."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True).stdout
    window, function = [], ""
    for line in text.split("\n"):
        if line.endswith(">:"):
            window, function = [], line
            continue
        window = (window + [line])[-10:]
        call = CALL.search(line)
        if not call or call.group(1) != "swift_allocObject@plt":
            continue
        # the instructions since the last call before this one
        since = []
        for prev in reversed(window[:-1]):
            since.insert(0, prev)
            if CALL.search(prev):
                break
        if not since or not CALL.search(since[0]) or not CALL.search(since[0]).group(1).endswith("CMa"):
            continue
        meta = CALL.search(since[0]).group(1)
        holders = {"rax"}
        size = None
        for prev in since[1:]:
            m = MOV_REG.search(prev)
            if m and m.group(1) in holders:
                holders.add(m.group(2))
            s = SIZE.search(prev)
            if s:
                size = int(s.group(1), 16)
        if size is not None and "rdi" in holders:
            yield meta, size, function


def main(binaries):
    if not binaries:
        print(__doc__.strip().split("\n")[-1])
        return 2
    sizes = collections.defaultdict(lambda: collections.defaultdict(set))
    sites = 0
    for b in binaries:
        for meta, size, function in allocation_sites(b):
            sizes[meta][size].add(b.split("/")[-1])
            sites += 1
    bad = {m: s for m, s in sizes.items() if len(s) > 1}
    for meta, by_size in sorted(bad.items()):
        print(f"class {meta[:-3]} is allocated with {len(by_size)} sizes: "
              + "; ".join(f"{size} bytes in {', '.join(sorted(bins))}" for size, bins in sorted(by_size.items())))
    print(f"{'FAIL' if bad else 'ok'}: {sites} allocation sites of {len(sizes)} classes in {len(binaries)} binaries"
          + (f", {len(bad)} classes with two sizes (see the top of {sys.argv[0]})" if bad else ", one size each"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
