"""Promises of the repository itself: the README's commands, CI, and a light `import reweight`."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_import_reweight_imports_no_optional_dependency():
    code = (
        "import sys, reweight; heavy = {'transformers', 'timm', 'lightning', 'pytorch_lightning', 'higher',"
        " 'matplotlib', 'sklearn', 'mnist1d', 'torchvision', 'cleanlab'}; print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
