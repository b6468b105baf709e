"""Regenerates jaxinfer_pb2.py / jaxinfer_pb2_grpc.py from jaxinfer.proto with grpcio-tools:
``python -m jaxinfer.server.gen_stubs``. The generated files are committed."""
from __future__ import annotations

import pathlib
import re

from grpc_tools import protoc


def main() -> None:
  here = pathlib.Path(__file__).parent
  rc = protoc.main(["grpc_tools.protoc", f"-I{here}", f"--python_out={here}",
                    f"--grpc_python_out={here}", str(here / "jaxinfer.proto")])
  if rc:
    raise SystemExit(f"protoc failed ({rc})")
  grpc_file = here / "jaxinfer_pb2_grpc.py"
  # protoc writes a top-level import; the stubs live in a package.
  grpc_file.write_text(re.sub(r"^import jaxinfer_pb2 as", "from jaxinfer.server import jaxinfer_pb2 as",
                              grpc_file.read_text(), flags=re.M))


if __name__ == "__main__":
  main()
