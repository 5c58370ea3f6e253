"""The README's Python example runs as a script, as a user would run it (worker processes
re-import it, which is why it has a ``__main__`` guard)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_as_a_script(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'if __name__ == "__main__":' in code
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"(\d+) objects; accuracy at IoU 0.5: ([0-9.]+)", done.stdout)
    assert found and int(found.group(1)) > 0, done.stdout[-2000:]
    for store in ("ls.ome.zarr", "net.ome.zarr", "den.ome.zarr", "seg.ome.zarr", "n2v2.model"):
        assert (tmp_path / store).exists()


def test_readme_workflow_example_runs_as_a_script(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Workflows"):readme.index("## What works today")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "workflow_example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"objects: [1-9]", done.stdout), done.stdout[-2000:]
    for path in ("result.ome.zarr/labels/nuclei", "result.ome.zarr/reports/report.html",
                 "result.ome.zarr/_tilewise/provenance.json"):
        assert (tmp_path / path).exists(), path
