"""Generate the Python stubs of ``proto/`` into ``server/_gen`` (never edit those files by hand).

    python -m spruce.server.protogen          # regenerate
    python -m spruce.server.protogen --check  # exit 1 if the committed stubs differ (run by the tests)

grpcio-tools writes imports after the .proto path (``from spruce.v1 import ...``); they are rewritten
to the installed location (``spruce.server._gen.spruce.v1``), the only change made to protoc's output.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_gen"
PROTOS = ("spruce/v1/spruce.proto",)
PACKAGE = "spruce.server._gen"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *PROTOS]) != 0:
        raise SystemExit("protoc failed")
    files = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        for proto in PROTOS:
            module = proto.rsplit("/", 1)[0].replace("/", ".")
            text = text.replace(f"from {module} import", f"from {PACKAGE}.{module} import")
        path.write_text(text)
        files.append(path)
    for folder in {p.parent for p in files} | {out}:
        while folder != out.parent:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
                files.append(init)
            folder = folder.parent
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if not args.check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_gen"
        stale = [
            str(p.relative_to(fresh))
            for p in generate(fresh)
            if not (OUT_DIR / p.relative_to(fresh)).exists() or not filecmp.cmp(p, OUT_DIR / p.relative_to(fresh), shallow=False)
        ]
    if stale:
        print(f"stubs out of date: {stale}; run python -m spruce.server.protogen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
