"""OpenVINO's Cores and the scheduler's SIGTERM: after models compiled by OpenVINO and quantized by
NNCF are freed in any order, a signal to a Python handler is still delivered (each Core swaps the
thread's alternate signal stack and, destroyed out of order, left it pointing at unmapped memory:
the next SIGTERM was a SIGSEGV, exit 139)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

SCRIPT = textwrap.dedent(
    """
    import gc, os, signal
    import torch
    from compress_cli.quantization.openvino import nncf_quantize
    from compress_cli.runtime.openvino import OvModule, ov_convert, signal_stack

    before = signal_stack()
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 1, 8, 8)
    om, spec, _ = ov_convert(m, x)
    a = OvModule(om)
    a(x)
    b = OvModule(nncf_quantize(ov_convert(m, x)[0], spec, [x], [], False))
    b(x)
    del a; gc.collect(); del b; gc.collect()  # freed first-made first: the order that broke it
    assert signal_stack() == before, (signal_stack(), before)
    seen = []
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]
    print("delivered")
    """
)


def test_sigterm_is_delivered_after_openvino_models_are_freed_out_of_order():
    # a child process: the failure this guards against is a SIGSEGV that would kill pytest
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "delivered" in done.stdout, (done.returncode, done.stderr[-2000:])
