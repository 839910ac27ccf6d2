"""README's "Use it as a library" snippets run as written (tiny presets, shipped data)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_snippets() -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return re.findall(r"```python library\n(.*?)```", readme, flags=re.DOTALL)


def test_readme_library_snippets_run(shipped_data_dir, tmp_path, capsys):
    snippets = library_snippets()
    assert len(snippets) >= 3
    namespace = {"DATA_DIR": shipped_data_dir, "WORKDIR": str(tmp_path)}
    for snippet in snippets:  # in order: later snippets use what earlier ones made
        exec(compile(snippet, "README.md", "exec"), namespace)
    # The snippets' prints, without TFDS's dataset-preparation messages.
    printed = [
        line
        for line in capsys.readouterr().out.splitlines()
        if not line.startswith(("Downloading", "Dataset "))
    ]
    assert printed[0].startswith("4 ")  # final_step of the tiny DDPM
    assert printed[1].startswith("ddpm 4 4 ")
    assert printed[2] == "(4,) (4, 16, 16)"
    assert len(os.listdir(os.path.join(tmp_path, "synthetic"))) >= 2  # class folders + provenance
