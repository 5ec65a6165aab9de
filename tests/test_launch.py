"""The launch scripts and the Colab notebook (launch/).

The notebook runs headless on the CPU (nbclient) with tiny sizes; the shell
scripts get a syntax check; tpu_pod.sh's dry run shows the gcloud command it
would run, whose arguments must reach transkd_jax.main unchanged.
"""

import os
import shlex
import subprocess

import nbclient
import nbformat
import pytest
from runs import REPO, overrides

LAUNCH = REPO / "launch"
TPU_POD = LAUNCH / "tpu_pod.sh"


def test_notebook_trains_plots_and_predicts(tmp_path):
  nb = nbformat.read(LAUNCH / "colab_tpu.ipynb", as_version=4)
  params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "one cell tagged 'parameters'"
  workdir = tmp_path / "run"
  extra = overrides(str(tmp_path / "data"), total_steps=3)
  # As papermill does: a cell after the parameters cell overrides them.
  injected = nbformat.v4.new_code_cell(
    f"SKIP_INSTALL = True\nWORKDIR = {str(workdir)!r}\nEXTRA_OVERRIDES = {extra!r}\n"
    "NUM_PREDICTIONS = 2\n",
    metadata={"tags": ["injected-parameters"]},
  )
  nb.cells.insert(params[0] + 1, injected)
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
  )
  try:
    client.execute()
  finally:  # keep the executed notebook for a look when something failed
    nbformat.write(nb, tmp_path / "executed.ipynb")
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "SKIP_INSTALL=True" in text
  assert "done: step 3" in text  # main's output is printed in the notebook
  assert (workdir / "metrics.jsonl").stat().st_size > 0
  overlays = sorted((workdir / "predictions").glob("*_overlay.png"))
  assert len(overlays) == 2, overlays
  assert len(list((workdir / "predictions").glob("*_color.png"))) == 2
  images = [
    o
    for c in nb.cells
    for o in c.get("outputs", [])
    if o.output_type == "display_data" and "image/png" in o.get("data", {})
  ]
  assert len(images) >= 2  # the overlays (and the loss plot when matplotlib is there)


def test_notebook_without_matplotlib_and_a_failing_command(tmp_path):
  """The plot cell without matplotlib prints and goes on; a failing command fails its cell."""
  nb = nbformat.read(LAUNCH / "colab_tpu.ipynb", as_version=4)
  setup = next(c for c in nb.cells if "def run(" in c.source)
  plot = next(c for c in nb.cells if "read_metrics" in c.source)
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1, "split": "train", "loss": 2.5}\n{"step": 2, "split": "train", "loss": 2.0}\n'
  )
  new = nbformat.v4.new_code_cell
  nb.cells = [
    new(
      "import sys\nsys.modules['matplotlib'] = None  # import matplotlib fails\n"
      f"WORKDIR = {str(tmp_path)!r}\nclass config:\n  method = 'student'\n"
    ),
    setup,
    plot,
    new("run([sys.executable, '-c', 'import sys; print(\"boom\"); sys.exit(3)'])"),
  ]
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
  )
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="CalledProcessError"):
    client.execute()
  plot_text = "".join(o.get("text", "") for o in nb.cells[2].outputs)
  assert "step 2: loss 2.0000" in plot_text and "matplotlib is not installed" in plot_text
  assert "boom" in "".join(o.get("text", "") for o in nb.cells[3].outputs)


@pytest.mark.parametrize(
  "script", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
)
def test_launch_scripts_parse(script):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def _tpu_pod(args, **env):
  environment = {
    k: v
    for k, v in os.environ.items()
    if k
    not in (
      "TPU_NAME",
      "ZONE",
      "PROJECT",
      "REPO_URL",
      "BRANCH",
      "INSTALL",
      "REMOTE_DIR",
      "REMOTE_PYTHON",
      "DRY_RUN",
    )
  }
  environment.update(env)
  return subprocess.run(
    ["bash", str(TPU_POD), *args], capture_output=True, text=True, env=environment, cwd=REPO
  )


ARGS = [
  "--config=configs/cityscapes.py",
  "--workdir=/nfs/runs/my run",
  "--mode=train",
  "--config.image_size=(512, 1024)",
  "--config.data.root=/data/it's $HOME; rm -rf ~",
  '--config.note="quoted"',
]


def test_tpu_pod_dry_run_prints_the_gcloud_command():
  proc = _tpu_pod(
    ARGS,
    DRY_RUN="1",
    TPU_NAME="pod-1",
    ZONE="us-central2-b",
    PROJECT="my-proj",
    REPO_URL="https://example.com/transkd-jax.git",
    BRANCH="dev",
  )
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if line.startswith("gcloud ")]
  assert len(lines) == 1, proc.stdout
  words = shlex.split(lines[0])  # what bash would pass to gcloud
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert {"--zone=us-central2-b", "--worker=all", "--project=my-proj"} <= set(words)
  (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
  assert "git clone --quiet --branch dev https://example.com/transkd-jax.git" in command
  assert "pip install --quiet -e '.[tpu]'" in command
  # The worker's shell (bash) splits the command back into main's exact arguments.
  remote = shlex.split(command)
  start = remote.index("transkd_jax.main") + 1
  assert remote[start:] == ["--distributed=on", *ARGS]  # JAX asks the TPU VM metadata


def test_tpu_pod_passes_arguments_through_a_shell_unchanged(tmp_path):
  """The worker command, run by bash with a stand-in python3, gives main exactly ARGS."""
  proc = _tpu_pod(
    ARGS, DRY_RUN="1", TPU_NAME="pod-1", ZONE="z", INSTALL="0", REMOTE_DIR=str(tmp_path)
  )
  assert proc.returncode == 0, proc.stderr
  (line,) = [line for line in proc.stdout.splitlines() if line.startswith("gcloud ")]
  (command,) = [
    w.removeprefix("--command=") for w in shlex.split(line) if w.startswith("--command=")
  ]
  assert command.startswith(f"set -e; cd {shlex.quote(str(tmp_path))}; exec python3 -m ")
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
  (fake / "python3").chmod(0o755)
  out = tmp_path / "args.txt"
  subprocess.run(
    ["bash", "-c", command],
    check=True,
    env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ARGS_OUT=str(out)),
  )
  assert out.read_text().splitlines() == ["-m", "transkd_jax.main", "--distributed=on", *ARGS]


def test_tpu_pod_names_missing_settings():
  proc = _tpu_pod(["--mode=info"], DRY_RUN="1", ZONE="z")
  assert proc.returncode == 2
  assert "TPU_NAME" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  assert "gcloud" not in proc.stdout
  proc = _tpu_pod(["--mode=info"], DRY_RUN="1")
  assert "TPU_NAME and ZONE not set" in proc.stderr
  proc = _tpu_pod([])
  assert proc.returncode == 2 and "usage" in proc.stderr.lower() + proc.stdout.lower()
  proc = _tpu_pod(["--help"])
  assert proc.returncode == 0 and "DRY_RUN=1" in proc.stdout
