"""Find a real Triton Inference Server and prepare the Python backend it loads our model with.

Two places a `tritonserver` can come from: one on PATH (NVIDIA's container ships /opt/tritonserver), or the
binary inside the `nvidia-pytriton` wheel, which also carries the Python backend, a backend stub per Python
version, and its shared libraries in the sibling folder `nvidia_pytriton.libs/`.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from kubrick.errors import KubrickError

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary, the libraries it needs, and where its Python backend comes from."""

    binary: Path
    python_backend: Path  # folder holding libtriton_python.so and triton_python_backend_utils.py
    stub: Path | None  # the backend stub for this Python; None: use the one inside python_backend
    lib_dirs: tuple[Path, ...] = field(default=())
    source: str = ""  # "PATH" or "nvidia-pytriton wheel", for messages


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton() -> TritonInstall:
    """The tritonserver to run: one on PATH first, else the nvidia-pytriton wheel's; or a clear error."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        root = binary.parent.parent  # /opt/tritonserver/bin/tritonserver -> /opt/tritonserver
        backend = root / "backends" / "python"
        if (backend / "libtriton_python.so").exists():
            return TritonInstall(binary=binary, python_backend=backend, stub=None, source="PATH")
    wheel = _from_pytriton_wheel()
    if wheel is not None:
        return wheel
    raise KubrickError(
        "no Triton Inference Server found: install the server extras (pip install 'kubrick[serve]', which brings "
        "the nvidia-pytriton wheel and its tritonserver) or put a tritonserver with its Python backend on PATH"
    )


def _from_pytriton_wheel() -> TritonInstall | None:
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = package / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.exists():
        return None
    stub = dist / "python_backend_stubs" / python_version() / STUB
    if not stub.exists():
        available = sorted(p.name for p in (dist / "python_backend_stubs").iterdir() if p.is_dir())
        raise KubrickError(
            f"the nvidia-pytriton wheel has no Python backend stub for Python {python_version()} "
            f"(it has {', '.join(available)}); run kubrick serve from a virtual environment of one of those"
        )
    libs = [package.parent / "nvidia_pytriton.libs", dist / "external_libs"]  # wheel / editable pytriton
    return TritonInstall(
        binary=binary,
        python_backend=dist / "backends" / "python",
        stub=stub,
        lib_dirs=tuple(p for p in libs if p.is_dir()),
        source="nvidia-pytriton wheel",
    )


def check_stub_numpy(install: TritonInstall) -> None:
    """Refuse a setup where every request would fail: the wheel's Python backend stub (Triton 2.51) reads string
    tensors wrongly under numpy 2 (each request then kills the stub: "unpack_from requires a buffer …")."""
    if install.source != "nvidia-pytriton wheel":
        return
    try:
        from importlib.metadata import version

        numpy_version = version("numpy")
    except Exception:  # no numpy: the model's own import will say so
        return
    if int(numpy_version.split(".")[0]) >= 2:
        raise KubrickError(
            f"this environment has numpy {numpy_version}, but the Python backend of the Triton server in the "
            "nvidia-pytriton wheel needs numpy 1.x (with numpy 2 every request fails); "
            "run: pip install 'numpy<2'"
        )


def prepare_backend_dir(install: TritonInstall, into: Path) -> Path:
    """A --backend-directory for tritonserver: the Python backend plus the stub for the running Python."""
    python = into / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in install.python_backend.iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    if install.stub is not None:
        shutil.copy2(install.stub, python / STUB)
    if not (python / STUB).exists():
        raise KubrickError(f"the Python backend in {install.python_backend} has no {STUB}; reinstall Triton")
    return into


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver, so that its Python stub runs this very Python environment.

    The stub embeds libpython and finds its prefix by looking up `python3` on PATH: putting this
    environment's bin first makes it import the installed kubrick, torch and friends.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    libs = [str(p) for p in install.lib_dirs]
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libpython_dir:
        libs.insert(0, libpython_dir)  # the stub then loads this Python's libpython, not the system's
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
