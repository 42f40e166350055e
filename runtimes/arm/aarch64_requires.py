"""Print a wheel's requirements as they apply on aarch64 Linux, one per line (extras left out).

`pip download --platform` evaluates dependency markers for the machine it runs on, so fetching for
aarch64 from x86 would follow x86-only requirements (executorch's coremltools, scikit-learn); this
reads the wheel's own metadata and evaluates its markers for the target instead.
"""
from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

AARCH64_LINUX = {"platform_machine": "aarch64", "platform_system": "Linux", "sys_platform": "linux",
                 "os_name": "posix", "python_version": "3.11", "python_full_version": "3.11.2",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def aarch64_requires(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(AARCH64_LINUX):
            req.marker = None
            out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(aarch64_requires(sys.argv[1])))
