#!/usr/bin/env bash
# Counts the public API of tower-idempotency from its rustdoc HTML: items per
# kind, how many public paths reach each item, and the public methods of
# its types and traits.
#
#   .ci/public-items.sh            build the docs (all features), then count
#   .ci/public-items.sh --no-build count docs already in target/doc
#   .ci/public-items.sh --list     also list every item with its paths
#
# An item is identified by its kind, name and the source line that defines it
# (rustdoc's `src` link), so a re-export, or a copy inlined at a second path,
# counts as a second path of the same item. Paths are item pages (one per
# path where rustdoc inlined the item) plus `pub use` lines in the
# "Re-exports" section of a module page.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
list=0
for arg in "$@"; do
    case "$arg" in
    --no-build) build=0 ;;
    --list) list=1 ;;
    *) echo "usage: $0 [--no-build] [--list]" >&2; exit 2 ;;
    esac
done
if [ "$build" = 1 ]; then
    cargo doc --all-features --no-deps --quiet
fi

LIST="$list" python3 - target/doc/tower_idempotency <<'EOF'
import html, os, re, sys
from collections import defaultdict

root = sys.argv[1]
kinds = ("struct", "enum", "trait", "fn", "constant", "type", "macro", "static", "union")
page_re = re.compile(r"^(%s)\.(.+)\.html$" % "|".join(kinds))
src_re = re.compile(r'href="(?:\.\./)*src/tower_idempotency/([^"#]+)\.html#(\d+)')
reexport_re = re.compile(r'<dt id="reexport\.([^"]+)"><code>(.*?)</code>', re.S)
anchor_re = re.compile(r'<a class="(\w+)" href="([^"]+)"')

def module_path(directory):
    rel = os.path.relpath(directory, os.path.dirname(root))
    return "::".join(rel.split(os.sep))

identity_of_page = {}       # page file -> identity
paths = defaultdict(set)    # identity -> public paths
methods = {}                # identity -> public methods

def methods_of(text, kind):
    if kind == "trait":
        end = text.find('id="implementors"')
        head = text if end < 0 else text[:end]
        return set(re.findall(r'id="(?:ty)?method\.([^"]+)"', head))
    if kind not in ("struct", "enum", "union"):
        return set()
    start = text.find('id="implementations-list"')
    if start < 0:
        return set()
    end = len(text)
    for marker in ('id="trait-implementations"', 'id="synthetic-implementations"',
                   'id="blanket-implementations"'):
        at = text.find(marker, start)
        if at >= 0:
            end = min(end, at)
    return set(re.findall(r'id="method\.([^"]+)"', text[start:end]))

for directory, _, files in os.walk(root):
    for name in files:
        match = page_re.match(name)
        if not match:
            continue
        path = os.path.join(directory, name)
        text = open(path, encoding="utf-8").read()
        if 'http-equiv="refresh"' in text or "<title>Redirection</title>" in text:
            continue
        kind, item = match.groups()
        src = src_re.search(text)
        identity = (kind, item, "%s:%s" % src.groups() if src else path)
        identity_of_page[os.path.normpath(path)] = identity
        paths[identity].add("%s::%s" % (module_path(directory), item))
        methods.setdefault(identity, methods_of(text, kind))

for directory, _, files in os.walk(root):
    if "index.html" not in files:
        continue
    text = open(os.path.join(directory, "index.html"), encoding="utf-8").read()
    for exported, code in reexport_re.findall(text):
        anchors = anchor_re.findall(code)
        if not anchors:
            continue  # a re-export of another crate's item
        _, href = anchors[-1]
        target = os.path.normpath(os.path.join(directory, html.unescape(href).split("#")[0]))
        identity = identity_of_page.get(target)
        if identity is None:
            continue  # a module, or an item of another crate
        paths[identity].add("%s::%s" % (module_path(directory), exported))

print("| kind | items | paths | items with >1 path |")
print("|---|---:|---:|---:|")
totals = [0, 0, 0]
for kind in kinds:
    ids = [i for i in paths if i[0] == kind]
    if not ids:
        continue
    row = [len(ids), sum(len(paths[i]) for i in ids), sum(len(paths[i]) > 1 for i in ids)]
    totals = [a + b for a, b in zip(totals, row)]
    print("| %s | %d | %d | %d |" % (kind, *row))
print("| **all** | **%d** | **%d** | **%d** |" % tuple(totals))
print()
print("public methods (inherent methods of types, methods of traits): %d"
      % sum(len(m) for m in methods.values()))
print("modules: %s" % " ".join(sorted(
    module_path(d) for d, _, f in os.walk(root) if "index.html" in f)))
several = sorted((sorted(p) for p in paths.values() if len(p) > 1))
if several:
    print()
    print("items with more than one path:")
    for p in several:
        print("  " + "  =  ".join(p))
if os.environ.get("LIST") == "1":
    print()
    print("every item (kind path [methods]):")
    for identity in sorted(paths, key=lambda i: sorted(paths[i])[0]):
        m = methods.get(identity) or ()
        print("  %-8s %s%s" % (identity[0], "  =  ".join(sorted(paths[identity])),
                               "  [%s]" % ", ".join(sorted(m)) if m else ""))
EOF
