"""The machine a run measured on, for the report: CPU model and the instruction sets that change
kernels (AVX2, AVX-512, VNNI, AMX), cores, the thread settings and OpenMP wait policy, the load
average, the GPU where one is used, and the versions of the runtimes that are installed."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: /proc/cpuinfo flags that select different CPU kernels (oneDNN, FBGEMM, ONNX Runtime, OpenVINO)
FLAG_PREFIXES = ("avx2", "avx512", "avx_vnni", "amx", "fma", "f16c")
#: distributions whose versions change the numbers, reported when installed
PACKAGES = ("torch", "onnxruntime", "openvino", "numpy")


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, the flags of ``FLAG_PREFIXES`` it has), from /proc/cpuinfo where readable."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = {x for x in value.split() if x.startswith(FLAG_PREFIXES)}
                    break
    except OSError:
        pass
    return model, sorted(flags)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str]:
    """Installed versions of ``PACKAGES`` (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def wait_policy() -> str:
    """OMP_WAIT_POLICY as this process's OpenMP read it, and who chose it."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy is None:
        return "unset (OpenMP default: spin a while, then sleep)"
    if os.environ.get("COMPRESS_SET_OMP_WAIT_POLICY") == "1":
        return f"{policy} (compress's default; set OMP_WAIT_POLICY to choose)"
    return f"{policy} (set by the user)"


def machine_facts(device: torch.device | None = None, threads: int | None = None) -> dict[str, Any]:
    """What the report says about the machine at the start of a run (``load_end`` is added at
    the end): ``threads`` is the measurement's thread setting (None: torch's current one)."""
    import torch

    from compress_cli.runtime.timing import usable_cores

    model, flags = cpu_info()
    facts: dict[str, Any] = {
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": wait_policy(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_start": load_average(),
        "versions": versions(),
    }
    if device is not None and device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        facts["gpu"] = torch.cuda.get_device_name(i)
        facts["cuda"] = torch.version.cuda
        facts["gpu_driver"] = _nvidia_driver()
    return facts


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), None)
