"""The repository's promises to a newcomer: README commands, CI, attribution."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_commands = [b for b in _bash_blocks(readme) if "pytest" in b]
    assert len(test_commands) == 1, test_commands
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_shipped_data_keeps_its_attribution():
    notice = (ROOT / "cxrjax" / "data" / "resources" / "README.md").read_text()
    for needle in ("CC BY 4.0", "MedMNIST v2", "Kermany"):
        assert needle in notice
        assert needle in (ROOT / "README.md").read_text()
