"""The README's 'Three lines in your loop' snippet runs as written, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_loop_snippet_is_self_contained_and_trains():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Three lines in your loop", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = "\nassert reweighter.step_count == len(train_loader) == 16, reweighter.step_count\nprint('ok')\n"
    code = "import torch; torch.set_num_threads(1)\n" + snippet + check
    out = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_readme_loss_history_snippet_is_self_contained_and_trains():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Each sample's loss history", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = (
        "\nstore = reweighter.state_dict()['loss_history']\n"
        "assert reweighter.step_count == 2 * len(train_loader) and bool(store['seen'].all()), store\nprint('ok')\n"
    )
    code = "import torch; torch.set_num_threads(1)\n" + snippet + check
    out = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
