"""Virtualenvs for the peers a benchmark compares against but Tessera cannot install beside itself.

mosaicml-streaming pins numpy<2.2 and (through transformers) an older tokenizers; img2dataset pins
webdataset<0.3. Each gets its own venv under ``.cache/bench-peers/<name>``, built on first use from
PyPI with the versions below. The streaming venv sees Tessera's venv after its own packages (a
``.pth`` line), so it reuses the installed CPU torch instead of pulling one (a CUDA build) from PyPI.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".cache" / "bench-peers"
REQUIREMENTS = {
    "streaming": ["mosaicml-streaming==0.13.0"],
    "img2dataset": ["img2dataset==1.47.0", "s3fs"],  # s3fs: its s3:// output folders
}
SHARES_TESSERA_VENV = {"streaming"}


def peer_python(name: str) -> Path:
    """The peer venv's python, after creating the venv when it is missing (minutes, once)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating the {name} peer venv in {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    constraints = []
    if name in SHARES_TESSERA_VENV:
        import torch

        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(purelib) / "zz-tessera-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pin = venv / "constraints.txt"
        pin.write_text(f"torch=={torch.__version__}\n")
        constraints = ["-c", str(pin)]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *constraints, *REQUIREMENTS[name]], check=True)
    return python


def peer_version(name: str, distribution: str) -> str:
    return subprocess.run(
        [str(peer_python(name)), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
