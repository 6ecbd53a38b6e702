"""Broken or conflicting plugins as real installed distributions: a *.dist-info folder with an
entry_points.txt on sys.path, which importlib.metadata finds like any pip-installed package."""

import textwrap


def install_fake_plugin(root, dist, entry_points: dict, modules: dict):
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[openrlhf_hooks]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
