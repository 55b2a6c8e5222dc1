"""Regenerate models/digits_cnn.safetensors (the quickstart's starting checkpoint).

    python scripts/make_quickstart_checkpoint.py

Runs recipes/digits_train.yaml (zoo:digits_cnn trained from scratch on the embedded digits set)
and saves the resulting weights as a plain safetensors state_dict.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import save_file

import compress_cli

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = compress_cli.run(REPO / "recipes/digits_train.yaml", output=tmp, force=True)
        model = compress_cli.load(Path(tmp) / "model")
    out = REPO / "models/digits_cnn.safetensors"
    out.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"wrote {out} ({out.stat().st_size} bytes), test accuracy {report['final']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
