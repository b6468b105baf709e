"""BUILD must match the real module graph: every first-party import of a target's sources is
provided by that target or its transitive deps, every module belongs to exactly one target, and the
dependency graph is acyclic. BUILD is evaluated here with stand-ins for the few Bazel rules it uses
(Starlark is Python syntax), so the check runs without Bazel; .ci/bazel_check.sh builds it for real."""
import ast
import glob as globlib
from pathlib import Path

ROOT = Path(__file__).parent.parent
FIRST_PARTY = ("jaxinfer", "kernels", "sharding", "checkpoints", "experiments")


def _load_build() -> dict[str, dict]:
  targets: dict[str, dict] = {}

  def rule(name, srcs=(), deps=(), **_):
    assert name not in targets, f"duplicate target {name}"
    targets[name] = {"srcs": list(srcs), "deps": [d.lstrip(":") for d in deps]}

  def glob(include, exclude=()):
    files = {f for pattern in include for f in globlib.glob(pattern, root_dir=ROOT, recursive=True)}
    files -= {f for pattern in exclude for f in globlib.glob(pattern, root_dir=ROOT, recursive=True)}
    return sorted(files)

  env = {"py_library": rule, "py_binary": rule, "py_test": rule, "glob": glob,
         "package": lambda **_: None}
  exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), env)
  return targets


def _module(path: str) -> str:
  mod = path[:-3].replace("/", ".")
  return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _imports(path: Path, modules: set[str]) -> set[str]:
  """First-party modules ``path`` imports (``from pkg import mod`` imports pkg.mod, not pkg)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
      found |= submodules or {node.module}
  return {m for m in found if m.split(".")[0] in FIRST_PARTY}


def test_build_matches_module_graph():
  targets = _load_build()
  owner = {}
  for name, t in targets.items():
    for src in t["srcs"]:
      assert src not in owner or src.startswith("tests/"), f"{src} in {owner[src]} and {name}"
      owner.setdefault(src, name)
  module_owner = {_module(src): name for src, name in owner.items()}

  def closure(name, seen=()):
    assert name not in seen, f"dependency cycle: {' -> '.join((*seen, name))}"
    out = {name}
    for d in targets[name]["deps"]:
      out |= closure(d, (*seen, name))
    return out

  problems = []
  for name, t in targets.items():
    reach = closure(name)
    for src in t["srcs"]:
      for mod in _imports(ROOT / src, set(module_owner)):
        provider = module_owner.get(mod)
        assert provider is not None or mod in FIRST_PARTY, f"{src} imports unknown module {mod}"
        if provider is not None and provider not in reach:
          problems.append(f"{src} ({name}) imports {mod} from {provider}, not in its deps")
  assert not problems, "\n".join(problems)

  py_files = {str(p.relative_to(ROOT)) for pkg in FIRST_PARTY for p in (ROOT / pkg).rglob("*.py")}
  assert not sorted(py_files - set(owner)), "modules in no BUILD target"
