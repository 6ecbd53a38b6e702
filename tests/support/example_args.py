"""The command line an example script (examples/*.sh) builds, read by running the script itself with a
stand-in python that prints its arguments (the script's --cpu branch execs "$PYTHON -m ...")."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def example_args(script: str, env: dict, tmp_path: Path) -> list:
    """The launcher flags examples/<script> passes, with the script's default sizes unless `env` sets them."""
    fake = tmp_path / "print_args"
    fake.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / script), "--cpu"],
        env={**os.environ, **env, "PYTHON": str(fake)},
        capture_output=True,
        check=True,
    )
    argv = result.stdout.decode().split("\0")[:-1]
    assert argv[:2] == ["-m", "openrlhf_hooks.train_ppo_ray"] and argv[-1] == "--cpu", argv
    return argv[2:-1]
