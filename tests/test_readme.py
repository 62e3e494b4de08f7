"""The README a newcomer follows: its Python snippet runs as written, its serving example does not
collide with ``make ui`` and sends a well-formed body, and it stays short."""

import json
import re
import subprocess
import sys

import numpy as np
import torch

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _datamodels_file(path, p=1000, t=797):
    """A datamodels.pt of the digits demo's shape (seeded sparse weights), as regress writes one."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(p, t)) * (rng.random((p, t)) < 0.05)
    path.parent.mkdir(parents=True)
    torch.save({"weight": torch.tensor(weight, dtype=torch.float32), "bias": torch.zeros(t),
                "mean": torch.full((p,), 0.5), "std": torch.full((p,), 0.5), "lam": torch.ones(t)}, path)


def test_the_python_snippet_runs_as_written(tmp_path):
    [snippet] = [b for b in _blocks("python") if "Datamodels.load" in b]
    _datamodels_file(tmp_path / "data" / "digits" / "reg_results" / "datamodels.pt")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("(4, 797) [")


def test_serving_example_has_its_own_port_and_a_json_body(tmp_path):
    [serve] = [b for b in _blocks("bash") if "mlflow models serve" in b]
    port = re.search(r"mlflow models serve .*--port (\d+)", serve).group(1)
    assert port != "5000" and f"127.0.0.1:{port}/invocations" in serve
    make_body = re.search(r"^(python -c '.*') > body.json$", serve, re.M).group(1)
    body = subprocess.run(["bash", "-c", make_body.replace("python ", f"{sys.executable} ", 1)],
                          capture_output=True, text=True, check=True).stdout
    rows = json.loads(body)["inputs"]
    assert len(rows) == 1 and len(rows[0]) == 1000 and all(isinstance(v, bool) for v in rows[0])


def test_the_readme_is_short():
    # the newcomer's path stays within 300 lines; the Layout section after it is the map of every
    # module (one line each, issue 21), reference rather than reading
    path, layout = README.split("\n## Layout\n", 1)
    assert len(path.splitlines()) <= 300
    assert "\n## " not in layout  # the map is the last section
