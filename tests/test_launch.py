"""The launch scripts and the Colab notebook (launch/).

The notebook runs headless on the CPU (nbclient) with tiny sizes, and its set-up code
(install command per accelerator, Drive, stopping a command) runs here or in a subprocess;
the shell scripts get a syntax check; tpu_pod.sh's dry run shows the commands it would run
(whose arguments must reach transkd_jax.main unchanged) and its real run works against a
stand-in gcloud; slurm.sbatch runs against a stand-in srun.
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import nbclient
import nbformat
import pytest
from runs import REPO, overrides

LAUNCH = REPO / "launch"
NOTEBOOK = LAUNCH / "colab_tpu.ipynb"
TPU_POD = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm.sbatch"
needs_git = pytest.mark.skipif(
  not (REPO / ".git").exists(), reason="tpu_pod.sh ships the checkout's HEAD: needs git"
)


def _code_cell(nb, text):
  """The notebook's one code cell whose source contains text."""
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
  return cell


def _params_cell(nb):
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "one cell tagged 'parameters'"
  return params[0]


def _notebook_namespace(**params):
  """The notebook's parameters (params over them) and its set-up cell, run in this process."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  namespace = {}
  exec(_params_cell(nb).source, namespace)
  namespace.update(params)
  exec(_code_cell(nb, "def run(").source, namespace)
  return namespace


def _execute(nb, path, timeout):
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(path)}}
  )
  client.execute()


def test_notebook_trains_plots_and_predicts(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
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
  try:
    _execute(nb, tmp_path, timeout=600)
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
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1, "split": "train", "loss": 2.5}\n{"step": 2, "split": "train", "loss": 2.0}\n'
  )
  new = nbformat.v4.new_code_cell
  nb.cells = [
    _params_cell(nb),
    new(
      "import sys\nsys.modules['matplotlib'] = None  # import matplotlib fails\n"
      f"WORKDIR = {str(tmp_path)!r}\nclass config:\n  method = 'student'\n"
    ),
    _code_cell(nb, "def run("),
    _code_cell(nb, "read_metrics"),
    new("run([sys.executable, '-c', 'import sys; print(\"boom\"); sys.exit(3)'])"),
  ]
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="CalledProcessError"):
    _execute(nb, tmp_path, timeout=120)
  plot_text = "".join(o.get("text", "") for o in nb.cells[3].outputs)
  assert "step 2: loss 2.0000" in plot_text and "matplotlib is not installed" in plot_text
  assert "boom" in "".join(o.get("text", "") for o in nb.cells[4].outputs)


def test_notebook_install_commands_and_the_unconfigured_stop(tmp_path):
  """pip gets [tpu], [cuda] or no extra; with no SOURCE and no transkd_jax the install cell
  shows one line, no traceback, and the notebook stops there."""
  assert "YOUR_ORG" not in NOTEBOOK.read_text()  # no placeholder to edit
  nb = nbformat.read(NOTEBOOK, as_version=4)
  new = nbformat.v4.new_code_cell
  nb.cells = [
    _params_cell(nb),
    new('SOURCE = ""\nimport sys\nsys.modules["transkd_jax"] = None  # not importable\n'),
    _code_cell(nb, "def run("),
    new(
      "import json\n"
      'commands = {a: install_command("/src/transkd-jax", a) for a in ("tpu", "gpu", "cpu")}\n'
      "print(json.dumps(commands))"
    ),
    _code_cell(nb, "fetch_source(SOURCE)"),
    new('print("after the install cell")'),
  ]
  with pytest.raises(nbclient.exceptions.CellExecutionError):
    _execute(nb, tmp_path, timeout=120)
  commands = json.loads(nb.cells[3].outputs[0]["text"])
  pip = ["-m", "pip", "install", "-q", "-e"]
  assert commands["tpu"][1:] == [*pip, "/src/transkd-jax[tpu]"]
  assert commands["gpu"][1:] == [*pip, "/src/transkd-jax[cuda]"]
  assert commands["cpu"][1:] == [*pip, "/src/transkd-jax"]
  (error,) = nb.cells[4].outputs
  assert error.output_type == "error" and error.ename == "Stop"
  assert error.traceback == [
    "transkd_jax is not installed: set SOURCE (first code cell) to a git URL, a checkout "
    "directory or a .tar.gz / .zip of transkd-jax"
  ]
  assert nb.cells[5].outputs == []  # Run all stopped at the install cell


def test_notebook_detects_the_accelerator(tmp_path, monkeypatch):
  namespace = _notebook_namespace()
  detect = namespace["detect_accelerator"]
  monkeypatch.setattr(glob, "glob", lambda pattern: [])  # no /dev/accel*, /dev/nvidia*
  for name in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "COLAB_GPU"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))
  assert detect() == "cpu"
  monkeypatch.setenv("COLAB_GPU", "0")
  assert detect() == "cpu"
  nvidia_smi = tmp_path / "nvidia-smi"
  nvidia_smi.write_text("#!/bin/sh\n")
  nvidia_smi.chmod(0o755)
  assert detect() == "gpu"
  nvidia_smi.unlink()
  monkeypatch.setenv("COLAB_GPU", "1")
  assert detect() == "gpu"
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  assert detect() == "tpu"
  assert _notebook_namespace(ACCELERATOR="gpu")["ACCELERATOR"] == "gpu"  # set: not detected
  with pytest.raises(Exception, match="ACCELERATOR='v5e': expected"):
    _notebook_namespace(ACCELERATOR="v5e")


def test_notebook_mounts_drive_for_drive_paths(monkeypatch):
  mounts = []
  colab = types.ModuleType("google.colab")
  colab.drive = types.SimpleNamespace(mount=mounts.append)
  monkeypatch.setitem(sys.modules, "google.colab", colab)  # IN_COLAB
  _notebook_namespace()  # the defaults: nothing on Drive
  assert mounts == []
  for name in ("SOURCE", "WORKDIR", "CITYSCAPES_ROOT", "TEACHER_PTH"):
    _notebook_namespace(**{name: "/content/drive/MyDrive/x"})
  assert mounts == ["/content/drive"] * 4


def test_notebook_fetches_an_archive_or_a_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fetch = _notebook_namespace()["fetch_source"]
  checkout = tmp_path / "repo"
  (checkout / "configs").mkdir(parents=True)
  (checkout / "setup.cfg").write_text("[metadata]\n")
  assert fetch(str(checkout)) == str(checkout)
  subprocess.run(["tar", "-czf", "repo.tar.gz", "repo"], check=True)  # one top folder
  unpacked = Path(fetch(str(tmp_path / "repo.tar.gz")))
  assert unpacked == tmp_path / "transkd-jax-unpacked" / "repo"
  assert (unpacked / "setup.cfg").is_file() and (unpacked / "configs").is_dir()
  with pytest.raises(Exception, match="is a file but not a .tar.gz"):
    fetch(str(checkout / "setup.cfg"))
  with pytest.raises(Exception, match="is no directory, file or git URL"):
    fetch("no/such/dir")


@pytest.mark.parametrize(
  "params, devices, batch, per_device",
  [
    ({}, 3, 0, 2),  # synthetic.py's global 4 over 3 devices: 2 per device
    ({}, 4, 4, 0),  # divides: left as it is
    ({"CONFIG": "configs/cityscapes.py"}, 3, 0, 2),  # per device already
    ({"EXTRA_OVERRIDES": ["--config.batch_size=5"]}, 3, 5, 0),  # the user's batch
  ],
)
def test_notebook_batch_per_device(monkeypatch, params, devices, batch, per_device):
  namespace = _notebook_namespace(**params)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  probe = lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 0, stdout=f"{devices}\n")
  monkeypatch.setattr(subprocess, "run", probe)  # the device count, without jax
  exec(_code_cell(nb, "def resolve_config(").source, namespace)
  config = namespace["config"]
  assert (config.batch_size, config.per_device_batch_size) == (batch, per_device)
  converted = ["--config.per_device_batch_size=2", "--config.batch_size=0"]
  assert (namespace["ARGS"][-2:] == converted) == (not params and devices == 3)


_INTERRUPTED = """
import json, os, signal, sys, threading, time

namespace = {}
exec(PARAMS, namespace)
exec(SETUP, namespace)
namespace["STOP_GRACE_S"] = 1
pids_file, ignore_sigterm = sys.argv[1], sys.argv[2]
CHILD = '''
import os, signal, subprocess, sys, time
if sys.argv[2] == "1":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen(["sleep", "60"])
with open(sys.argv[1] + ".tmp", "w") as f:
  f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
'''


def interrupt():  # as Runtime > Interrupt execution: SIGINT while run() reads the output
  while not os.path.exists(pids_file):
    time.sleep(0.02)
  signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


threading.Thread(target=interrupt, daemon=True).start()
start = time.monotonic()
try:
  namespace["run"]([sys.executable, "-c", CHILD, pids_file, ignore_sigterm])
  outcome = "returned"
except KeyboardInterrupt:
  outcome = "KeyboardInterrupt"
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))
"""


def _alive(pid):
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has ended


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_notebook_run_stops_the_command_on_interrupt(tmp_path, ignore_sigterm):
  """A KeyboardInterrupt in run() ends the command (SIGTERM, SIGKILL after STOP_GRACE_S) and
  what it started, then is raised again."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  script = tmp_path / "interrupted.py"
  script.write_text(
    f"PARAMS = {_params_cell(nb).source!r}\nSETUP = {_code_cell(nb, 'def run(').source!r}\n"
    + _INTERRUPTED
  )
  pids_file = tmp_path / "pids"
  proc = subprocess.run(
    [sys.executable, str(script), str(pids_file), str(int(ignore_sigterm))],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result["outcome"] == "KeyboardInterrupt"
  assert "stopping pid" in proc.stdout
  assert result["seconds"] < (10 if ignore_sigterm else 5), result  # not the child's 60 s
  child, grandchild = map(int, pids_file.read_text().split())
  assert not _alive(child) and not _alive(grandchild)


@pytest.mark.parametrize(
  "script", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
)
def test_launch_scripts_parse(script):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


TPU_POD_SETTINGS = (
  "TPU_NAME",
  "ZONE",
  "PROJECT",
  "REPO_URL",
  "BRANCH",
  "INSTALL",
  "REMOTE_DIR",
  "REMOTE_PYTHON",
  "VENV",
  "DRY_RUN",
)


def _tpu_pod(args, **env):
  environment = {k: v for k, v in os.environ.items() if k not in TPU_POD_SETTINGS}
  environment.update(env)
  return subprocess.run(
    ["bash", str(TPU_POD), *args], capture_output=True, text=True, env=environment, cwd=REPO
  )


def _gcloud_lines(stdout):
  """The gcloud commands a dry run prints, split as bash would pass them to gcloud."""
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def _remote_command(words):
  (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
  return command


ARGS = [
  "--config=configs/cityscapes.py",
  "--workdir=/nfs/runs/my run",
  "--mode=train",
  "--config.image_size=(512, 1024)",
  "--config.data.root=/data/it's $HOME; rm -rf ~",
  '--config.note="quoted"',
]
VENV_PYTHON = "~/transkd-venv/bin/python"  # the default VENV, as the workers' shell reads it


def _main_words(command):
  """What the worker's shell (bash) execs at the end of the command, as words."""
  words = shlex.split(command)
  return words[len(words) - words[::-1].index("exec") :]


@needs_git
def test_tpu_pod_dry_run_ships_the_checkout():
  """The default: git archive HEAD, scp to every worker, then on each a Python >= 3.11
  virtualenv, the archive unpacked, pip install -e '.[tpu]' and main."""
  proc = _tpu_pod(ARGS, DRY_RUN="1", TPU_NAME="pod-1", ZONE="us-central2-b")
  assert proc.returncode == 0, proc.stderr
  (archive_line,) = [line for line in proc.stdout.splitlines() if line.startswith("git ")]
  *git_archive, archive, head = shlex.split(archive_line)
  assert git_archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o"]
  assert head == "HEAD" and archive.endswith("/transkd-jax.tar.gz")
  scp, ssh = _gcloud_lines(proc.stdout)
  gcloud_scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[:7] == [*gcloud_scp, archive, "pod-1:transkd-jax.tar.gz"]
  assert {"--zone=us-central2-b", "--worker=all"} <= set(scp)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert {"--zone=us-central2-b", "--worker=all"} <= set(ssh)
  command = _remote_command(ssh)
  steps = [
    "for p in python3.12 python3.11 python3; do",
    '"$p" -c "import sys; sys.exit(sys.version_info < (3, 11))"',
    "sudo apt-get install python3.11 python3.11-venv",
    '"$py" -m venv ~/transkd-venv',
    "tar -xzf ~/transkd-jax.tar.gz -C ~/transkd-jax",
    "cd ~/transkd-jax;",
    f"{VENV_PYTHON} -m pip install --quiet -e '.[tpu]'",
    f"exec {VENV_PYTHON} -m transkd_jax.main",
  ]
  positions = [command.find(step) for step in steps]
  assert -1 not in positions and positions == sorted(positions), command
  assert "git clone" not in command
  assert _main_words(command) == [VENV_PYTHON, "-m", "transkd_jax.main", "--distributed=on", *ARGS]


def test_tpu_pod_dry_run_with_repo_url():
  """REPO_URL: every worker clones (or pulls) it instead; nothing is copied."""
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
  (words,) = _gcloud_lines(proc.stdout)  # no scp
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert {"--zone=us-central2-b", "--worker=all", "--project=my-proj"} <= set(words)
  command = _remote_command(words)
  assert (
    "git clone --quiet --branch dev https://example.com/transkd-jax.git ~/transkd-jax" in command
  )
  assert '"$py" -m venv ~/transkd-venv' in command and "tar " not in command
  assert f"{VENV_PYTHON} -m pip install --quiet -e '.[tpu]'" in command
  # The worker's shell (bash) splits the command back into main's exact arguments.
  assert _main_words(command) == [VENV_PYTHON, "-m", "transkd_jax.main", "--distributed=on", *ARGS]


def test_tpu_pod_passes_arguments_through_a_shell_unchanged(tmp_path):
  """The worker command, run by bash with a stand-in virtualenv, gives main exactly ARGS."""
  venv = tmp_path / "venv"
  settings = dict(INSTALL="0", REMOTE_DIR=str(tmp_path), VENV=str(venv))
  proc = _tpu_pod(ARGS, DRY_RUN="1", TPU_NAME="pod-1", ZONE="z", **settings)
  assert proc.returncode == 0, proc.stderr
  (words,) = _gcloud_lines(proc.stdout)
  command = _remote_command(words)
  assert command.startswith(
    f"set -e; cd {shlex.quote(str(tmp_path))}; exec {shlex.quote(str(venv))}/bin/python -m "
  )
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
  (venv / "bin" / "python").chmod(0o755)
  out = tmp_path / "args.txt"
  subprocess.run(["bash", "-c", command], check=True, env=dict(os.environ, ARGS_OUT=str(out)))
  assert out.read_text().splitlines() == ["-m", "transkd_jax.main", "--distributed=on", *ARGS]


def _fake_workers(tmp_path):
  """A stand-in gcloud (scp copies into one fake worker's home, ssh runs the command there
  with bash) and python3.12 (passes the version check; its virtualenv's python records
  each call's directory and arguments). Returns the environment for tpu_pod.sh."""
  bin_dir, home, tmp = tmp_path / "bin", tmp_path / "home", tmp_path / "tmp"
  for d in (bin_dir, home, tmp):
    d.mkdir()
  scripts = {
    "gcloud": """#!/bin/bash
echo "gcloud $*" >> "$FAKE_LOG"
if [[ "$4" == scp ]]; then
  cp "$5" "$FAKE_HOME/${6#*:}"
elif [[ "$4" == ssh ]]; then
  for arg in "$@"; do [[ "$arg" == --command=* ]] && command=${arg#--command=}; done
  cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec bash -c "$command"
fi
""",
    "python3.12": """#!/bin/bash
if [[ "$1" == -c ]]; then exit 0; fi
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python"; fi
""",
    "python3.9": "#!/bin/bash\nexit 1\n",  # fails the version check
    "venv-python": """#!/bin/bash
{ echo "cwd=$PWD"; printf '%s\\n' "$@"; echo --; } >> "$FAKE_CALLS"
""",
  }
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return dict(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    TMPDIR=str(tmp),
    FAKE_HOME=str(home),
    FAKE_LOG=str(tmp_path / "gcloud.log"),
    FAKE_CALLS=str(tmp_path / "calls.txt"),
    FAKE_VENV_PYTHON=str(bin_dir / "venv-python"),
    TPU_NAME="pod-1",
    ZONE="z",
  )


@needs_git
def test_tpu_pod_ships_installs_and_runs_on_a_fake_worker(tmp_path):
  env = _fake_workers(tmp_path)
  proc = _tpu_pod(ARGS, **env)
  assert proc.returncode == 0, proc.stderr
  log = (tmp_path / "gcloud.log").read_text().splitlines()
  assert [line.split()[:5] for line in log] == [
    ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
  ]
  home = tmp_path / "home"
  assert (home / "transkd-jax" / "transkd_jax" / "main.py").is_file()  # HEAD, unpacked
  assert (home / "transkd-jax" / "configs" / "cityscapes.py").is_file()
  assert not (home / "transkd-jax.tar.gz").exists()
  assert list((tmp_path / "tmp").iterdir()) == []  # the local archive is removed
  pip, main, _ = (tmp_path / "calls.txt").read_text().split("--\n")
  cwd = f"cwd={home / 'transkd-jax'}"
  assert pip.splitlines() == [cwd, "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
  assert main.splitlines() == [cwd, "-m", "transkd_jax.main", "--distributed=on", *ARGS]


def test_tpu_pod_stops_a_worker_without_python_3_11(tmp_path):
  env = _fake_workers(tmp_path)
  proc = _tpu_pod(
    ["--mode=info"], **env, REMOTE_PYTHON="python3.9", REPO_URL="https://example.invalid/x.git"
  )
  assert proc.returncode == 1
  hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  assert proc.stderr.splitlines() == [
    f"{hostname}: no Python >= 3.11 among python3.9: install one (e.g. sudo apt-get install "
    "python3.11 python3.11-venv) or set REMOTE_PYTHON"
  ]
  assert not (tmp_path / "home" / "transkd-jax").exists()


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
  assert proc.returncode == 0
  assert "DRY_RUN=1" in proc.stdout and "git archive HEAD" in proc.stdout and "VENV" in proc.stdout


def test_slurm_passes_cpus_and_gpus_to_srun(tmp_path):
  """srun gets --cpus-per-task (SLURM >= 22.05 does not pass it on), --kill-on-bad-exit and
  main's arguments unchanged; each task sees all 8 GPUs."""
  (tmp_path / "srun").write_text(
    '#!/bin/bash\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n'
    'echo "NCCL_DEBUG=$NCCL_DEBUG"\necho "PWD=$PWD"\nprintf "%s\\n" "$@"\n'
  )
  (tmp_path / "srun").chmod(0o755)
  environment = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "NCCL_")) and k not in ("JAX_LOCAL_DEVICE_IDS", "PYTHON")
  }
  environment.update(
    PATH=f"{tmp_path}:{os.environ['PATH']}",
    SLURM_CPUS_PER_TASK="16",
    SLURM_GPUS_PER_TASK="8",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_SUBMIT_DIR=str(REPO),
  )
  args = ["--config=configs/cityscapes.py", "--workdir=/x", "--mode=train", "--config.note=a b"]
  proc = subprocess.run(
    ["bash", str(SLURM), *args], capture_output=True, text=True, env=environment, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
    "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
    "NCCL_DEBUG=WARN",
    f"PWD={REPO}",
    "--kill-on-bad-exit=1",
    "--cpus-per-task=16",
    "python",
    "-m",
    "transkd_jax.main",
    *args,
  ]
  # No --cpus-per-task in the job: srun gets none; a NCCL_DEBUG set before is kept.
  del environment["SLURM_CPUS_PER_TASK"]
  environment["NCCL_DEBUG"] = "INFO"
  proc = subprocess.run(
    ["bash", str(SLURM), *args], capture_output=True, text=True, env=environment, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[1:5] == [
    "NCCL_DEBUG=INFO",
    f"PWD={REPO}",
    "--kill-on-bad-exit=1",
    "python",
  ]
