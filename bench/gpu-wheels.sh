#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on a lent GPU machine, which reaches no network. Run it here first:
#   bash bench/gpu-wheels.sh                                  # CPython 3.12 wheels into .whl/
#   bash bench/gpu-wheels.sh --python-version 3.11 /tmp/whl   # the same set for a local smoke run
#   bash bench/gpu-wheels.sh --py-spy                         # + py-spy (serving.py --profile)
# then name `.whl` in the device call's `carry` (bench/README.md, "On a lent GPU").
#
# The machine's python3 (3.12, torch 2.11 with CUDA) already has numpy, tokenizers, httpx, typer,
# prometheus-client, pytest, matplotlib and more (the device tool's KINDS.md lists them). WHEELS below
# is the rest of the closure of pyproject's runtime dependencies (and its `bench` extra, and what the
# pytest configuration loads), pinned to the versions this repository's tests run with here. After the
# download the script walks that closure again from pyproject.toml through the wheels' own metadata and
# fails if a requirement is neither carried (at a version that satisfies it) nor one of DEVICE_HAS, or if
# a wheel is carried that nothing needs. The project itself travels as source (PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

# name==version, one version each (two versions of one name stop the whole install there).
WHEELS=(
  # the web stack (fastapi's own dependencies included)
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-settings==2.16.3 python-dotenv==1.2.4 sse-starlette==3.7.1 python-multipart==0.0.34
  uvicorn==0.55.0 httptools==0.9.0 websockets==17.4 watchfiles==1.3.0
  # the machine has both, but pydantic, pydantic-core and anyio itself need typing-extensions>=4.16,
  # newer than an image built before it; these are the versions the smoke run checked together
  typing-extensions==4.16.0 anyio==4.16.0
  # storage and credentials
  sqlalchemy==2.1.9 greenlet==3.5.6 aiosqlite==0.22.1 alembic==1.20.1 mako==1.4.3
  argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1 pycparser==3.12
  # the reference model code (pure Python; its CUDA kernel is built only on request)
  rwkv==0.8.32
  # pyproject's pytest settings (asyncio_mode) need it; pytest and pytest-timeout are there
  pytest-asyncio==1.5.0
)
# Requirements of the closure that the machine's image already satisfies (by name; their versions are
# checked there, by bench/gpu.sh's `pip check` step).
DEVICE_HAS=(
  torch numpy tokenizers prometheus-client typer click rich shellingham markdown-it-py mdurl pygments
  h11 idna pyyaml uvloop markupsafe annotated-doc huggingface-hub filelock fsspec packaging tqdm
  hf-xet requests certifi charset-normalizer urllib3 httpx httpcore pytest pytest-timeout pluggy
  iniconfig matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
  jinja2 networkx sympy mpmath setuptools triton
)
# What the tests and benchmarks need besides pyproject's runtime dependencies (names from its `dev`
# extra, with its version bounds). httpx drives the serving benchmark; pytest runs the CUDA tests.
EXTRA_ROOTS=(pytest pytest-asyncio pytest-timeout httpx)

pyver=3.12
dest=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=$2; shift 2 ;;
    --py-spy) WHEELS+=(py-spy==0.4.3); EXTRA_ROOTS+=(py-spy); shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) dest=$1; shift ;;
  esac
done

mkdir -p "$dest"
rm -f "$dest"/*.whl # one version of each: nothing left over from an earlier download
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 \
  manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# pip's configuration here may name local indexes that hold only some packages: its warnings about
# them say nothing about what was found.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${WHEELS[@]}" 2> >(grep -v 'is ignored: it is neither a file' >&2)

python3 - "$dest" "$pyver" "${DEVICE_HAS[*]}" "${EXTRA_ROOTS[*]}" <<'PY'
"""Walk the dependency closure from pyproject.toml through the downloaded wheels' metadata."""

import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

dest, pyver = Path(sys.argv[1]), sys.argv[2]
device_has = {canonicalize_name(n) for n in sys.argv[3].split()}
extra_roots = {canonicalize_name(n) for n in sys.argv[4].split()}
env = {
    "python_version": pyver,
    "python_full_version": f"{pyver}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}

wheels = {}
problems = []
for path in sorted(dest.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    if name in wheels:
        problems.append(f"two versions of {name}")
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
    wheels[name] = (version, [Requirement(r) for r in requires], path)

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
roots = [Requirement(r) for r in project["dependencies"]]
roots += [Requirement(r) for r in project["optional-dependencies"]["bench"]]
dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
roots += [r for r in dev if canonicalize_name(r.name) in extra_roots]
roots += [Requirement(n) for n in extra_roots if n not in {canonicalize_name(r.name) for r in roots}]


def applies(req, extras):
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


# (requirement, who needs it, the extras its marker is evaluated under)
used, from_device, todo, seen = set(), {}, [(r, "pyproject.toml", ()) for r in roots], set()
while todo:
    req, parent, parent_extras = todo.pop()
    if not applies(req, parent_extras):
        continue
    name = canonicalize_name(req.name)
    if name in wheels:
        version, requires, _ = wheels[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{parent} needs {req}, carried {name} {version}")
        used.add(name)
        for extra in (None, *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            wanted = () if extra is None else (extra,)
            for sub in requires:
                in_extra = sub.marker is not None and "extra" in str(sub.marker)
                if (extra is None) != in_extra:
                    todo.append((sub, f"{name}[{extra}] {version}" if extra else f"{name} {version}", wanted))
    elif name in device_has:
        from_device.setdefault(name, set()).add(str(req.specifier) or "any")
    else:
        problems.append(f"{parent} needs {req}: neither carried nor on the machine")
for name in sorted(set(wheels) - used):
    problems.append(f"{name} is carried but nothing needs it")

total = 0
print(f"wheels for CPython {pyver} in {dest}/:")
for name in sorted(wheels):
    version, _, path = wheels[name]
    total += path.stat().st_size
    print(f"  {name:24} {version!s:10} {path.stat().st_size / 2**20:7.2f} MiB")
print(f"total {total / 2**20:.1f} MiB in {len(wheels)} wheels")
image = (f"{name} {' '.join(sorted(specs))}" for name, specs in sorted(from_device.items()))
print("from the machine's image: " + ", ".join(image))
for problem in problems:
    print(f"PROBLEM: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY

# What the device tool sends besides: tracked and untracked-but-not-ignored files.
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "with the working tree ($((tree / 1024)) KiB): $(((tree + carried) / 1024 / 1024)) MiB of the device tool's 64"
