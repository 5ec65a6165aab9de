"""The launch scripts and the Colab notebook (launch/).

The notebook runs headless on the CPU (nbclient) with tiny sizes, and its set-up code
(install command per accelerator, Drive, stopping a command) runs here or in a subprocess;
the shell scripts get a syntax check; tpu_pod.sh's dry run shows the commands it would run
(whose arguments must reach transkd_jax.main unchanged), and its real run (the run detached
on the workers, and --watch through a preemption) works against a stand-in gcloud whose
fake slice can be preempted; slurm.sbatch runs against stand-in srun, scancel and scontrol,
and requeues itself on USR1.
"""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
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
    f"NUM_PREDICTIONS = 2\nCONFIG = {str(REPO / 'tests' / 'tiny.py')!r}\n",  # tiny rows
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
  "FOLLOW",
  "POLL",
  "MAX_FAILURES",
  "QUEUED_RESOURCE",
  "ACCELERATOR_TYPE",
  "RUNTIME_VERSION",
  "SPOT",
  "PREEMPTIBLE",
  "CREATE_FLAGS",
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


def _run_script(command):
  """The script the worker command starts in the background (setsid nohup bash -c SCRIPT)."""
  words = shlex.split(command)
  (i,) = [i for i in range(len(words) - 1) if words[i : i + 2] == ["bash", "-c"]]
  assert words[i - 2 : i] == ["setsid", "nohup"], command
  return words[i + 2]


def _main_words(command):
  """main's command line, as words: the end of the script the worker starts."""
  words = shlex.split(_run_script(command))
  return words[words.index("transkd_jax.main") - 2 :]


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
  scp, ssh, follow = _gcloud_lines(proc.stdout)
  gcloud_scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[:7] == [*gcloud_scp, archive, "pod-1:transkd-jax.tar.gz"]
  assert {"--zone=us-central2-b", "--worker=all"} <= set(scp)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert {"--zone=us-central2-b", "--worker=all"} <= set(ssh)
  command = _remote_command(ssh)
  steps = [
    "exec 9>>~/transkd-run.lock; if ! flock -n 9; then",  # a second start fails, first
    "for p in python3.12 python3.11 python3; do",
    '"$p" -c "import sys; sys.exit(sys.version_info < (3, 11))"',
    "sudo apt-get install python3.11 python3.11-venv",
    '"$py" -m venv ~/transkd-venv',
    "tar -xzf ~/transkd-jax.tar.gz -C ~/transkd-jax",
    "cd ~/transkd-jax;",
    f"{VENV_PYTHON} -m pip install --quiet -e '.[tpu]'",
    "mv -f ~/transkd-run.log ~/transkd-run.log.1",
    "setsid nohup bash -c ",  # in the background, in a session of its own
    " > ~/transkd-run.log 2>&1 < /dev/null & echo $! > ~/transkd-run.pid;",
  ]
  positions = [command.find(step) for step in steps]
  assert -1 not in positions and positions == sorted(positions), command
  assert "git clone" not in command
  assert _run_script(command).startswith("trap 'echo $? > ~/transkd-run.exit' EXIT; ")
  assert _main_words(command) == [VENV_PYTHON, "-m", "transkd_jax.main", "--distributed=on", *ARGS]
  # Then worker 0's log until the run ends, and its exit status.
  assert follow[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert {"--zone=us-central2-b", "--worker=0"} <= set(follow)
  assert 'tail -n +1 --pid="$(cat ~/transkd-run.pid)" -f ~/transkd-run.log' in _remote_command(
    follow
  )


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
    FOLLOW="0",
  )
  assert proc.returncode == 0, proc.stderr
  (words,) = _gcloud_lines(proc.stdout)  # no scp, and FOLLOW=0: no ssh to follow the log
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
  venv, home = tmp_path / "venv", tmp_path / "home"
  settings = dict(INSTALL="0", REMOTE_DIR=str(tmp_path), VENV=str(venv))
  proc = _tpu_pod(ARGS, DRY_RUN="1", TPU_NAME="pod-1", ZONE="z", FOLLOW="0", **settings)
  assert proc.returncode == 0, proc.stderr
  (words,) = _gcloud_lines(proc.stdout)
  command = _remote_command(words)
  assert command.startswith("set -e; exec 9>>~/transkd-run.lock")  # the lock first
  assert f"; cd {shlex.quote(str(tmp_path))}; rm -f ~/transkd-run.exit" in command
  assert _main_words(command)[0] == f"{venv}/bin/python"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
  (venv / "bin" / "python").chmod(0o755)
  home.mkdir()
  out = tmp_path / "args.txt"
  env = dict(os.environ, ARGS_OUT=str(out), HOME=str(home))
  subprocess.run(["bash", "-c", command], check=True, env=env, timeout=20)
  _wait_for(home / "transkd-run.exit")  # the run, in the background, has ended
  assert (home / "transkd-run.exit").read_text() == "0\n"
  assert out.read_text().splitlines() == ["-m", "transkd_jax.main", "--distributed=on", *ARGS]


def _fake_workers(tmp_path):
  """A stand-in gcloud for one fake worker: scp copies into its home, ssh runs the command
  there with bash; describe, delete and create (tpu-vm or queued-resources) act on a fake
  slice whose state is in a file (READY at first), and storage cat reads gs://B/P from
  fake_gs/B/P. python3.12 passes the version check; its virtualenv's python records each
  call's directory and arguments, and as main does what FAKE_MAIN says (see venv-python).
  Returns the environment for tpu_pod.sh."""
  bin_dir, home, tmp = tmp_path / "bin", tmp_path / "home", tmp_path / "tmp"
  for d in (home, tmp):
    d.mkdir()
  _executables(
    bin_dir,
    {
      "gcloud": """#!/bin/bash
echo "gcloud $*" >> "$FAKE_LOG"
state=$FAKE_DIR/state  # the fake slice's state; no file: there is none
not_found() { echo "ERROR: (gcloud) NOT_FOUND: $5" >&2; exit 1; }
if [[ "$1 $2" == "storage cat" ]]; then exec cat "$FAKE_DIR/fake_gs/${3#gs://}"; fi
case "$4" in
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh)
    for arg in "$@"; do [[ "$arg" == --command=* ]] && command=${arg#--command=}; done
    cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec bash -c "$command" ;;
  describe)
    [[ -f "$state" ]] || not_found "$@"
    now=$(cat "$state")
    [[ "$now" == CREATING ]] && echo READY > "$state"  # READY at the next look
    [[ "$now" == PREEMPTED ]] && touch "$FAKE_DIR/seen-preempted"
    if [[ "$3" == queued-resources ]]; then
      case "$now" in READY) now=ACTIVE ;; PREEMPTED) now=SUSPENDED ;; *) now=PROVISIONING ;; esac
    fi
    echo "$now" ;;
  delete)  # the worker's processes end with it
    [[ -f "$state" ]] || not_found "$@"
    flock "$FAKE_HOME/transkd-run.lock" true
    rm "$state" ;;
  create)  # a new worker: an empty home
    [[ ! -f "$state" ]] || { echo "ERROR: (gcloud) ALREADY_EXISTS" >&2; exit 1; }
    find "$FAKE_HOME" -mindepth 1 -delete
    echo CREATING > "$state" ;;
esac
""",
      "python3.12": """#!/bin/bash
if [[ "$1" == -c ]]; then exit 0; fi
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python"; fi
""",
      "python3.9": "#!/bin/bash\nexit 1\n",  # fails the version check
      # As main (FAKE_MAIN): done: writes run_status.json "done"; preempt: the first run
      # preempts the slice, waits for the supervisor to see it and writes "preempted", the
      # next writes "done"; fail: exits 3; block: runs until $FAKE_DIR/release appears.
      "venv-python": """#!/bin/bash
{ echo "cwd=$PWD"; printf '%s\\n' "$@"; echo --; } >> "$FAKE_CALLS"
[[ "$2" == transkd_jax.main ]] || exit 0
echo "fake main: step 1"
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}; done
[[ "$workdir" == gs://* ]] && workdir=$FAKE_DIR/fake_gs/${workdir#gs://}
mkdir -p "$workdir"
wait_for() { for _ in $(seq 1000); do [[ -e "$1" ]] && return; sleep 0.02; done; exit 4; }
status() {
  echo "{\\"status\\": \\"$1\\", \\"step\\": $2, \\"total_steps\\": 10}" > "$workdir/run_status.tmp"
  mv "$workdir/run_status.tmp" "$workdir/run_status.json"
}
case "${FAKE_MAIN:-done}" in
  done) status done 10 ;;
  preempt)
    if [[ $(grep -c '^transkd_jax.main$' "$FAKE_CALLS") == 1 ]]; then
      echo PREEMPTED > "$FAKE_DIR/state"
      wait_for "$FAKE_DIR/seen-preempted"
      status preempted 5
    else
      status done 10
    fi ;;
  fail) exit 3 ;;
  block) wait_for "$FAKE_DIR/release" ;;
esac
""",
    },
  )
  (tmp_path / "state").write_text("READY\n")
  return dict(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    TMPDIR=str(tmp),
    FAKE_DIR=str(tmp_path),
    FAKE_HOME=str(home),
    FAKE_LOG=str(tmp_path / "gcloud.log"),
    FAKE_CALLS=str(tmp_path / "calls.txt"),
    FAKE_VENV_PYTHON=str(bin_dir / "venv-python"),
    TPU_NAME="pod-1",
    ZONE="z",
  )


def _gcloud_log(tmp_path):
  return (tmp_path / "gcloud.log").read_text().splitlines()


def _main_calls(tmp_path):
  calls = (tmp_path / "calls.txt").read_text().split("--\n")[:-1]
  return [c.splitlines()[1:] for c in calls if c.splitlines()[2] == "transkd_jax.main"]


@needs_git
def test_tpu_pod_ships_installs_and_runs_on_a_fake_worker(tmp_path):
  """Ships HEAD, installs, starts main in the background and follows worker 0's log until
  the run ends."""
  env = _fake_workers(tmp_path)
  args = [*ARGS[:1], f"--workdir={tmp_path / 'run'}", *ARGS[2:]]
  proc = _tpu_pod(args, **env)
  assert proc.returncode == 0, proc.stderr
  log = _gcloud_log(tmp_path)
  assert [line.split()[:5] for line in log] == [
    ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # worker 0's log
  ]
  assert "--worker=0" in log[2].split()
  home = tmp_path / "home"
  assert (home / "transkd-jax" / "transkd_jax" / "main.py").is_file()  # HEAD, unpacked
  assert (home / "transkd-jax" / "configs" / "cityscapes.py").is_file()
  assert not (home / "transkd-jax.tar.gz").exists()
  assert list((tmp_path / "tmp").iterdir()) == []  # the local archive is removed
  pip, main, _ = (tmp_path / "calls.txt").read_text().split("--\n")
  cwd = f"cwd={home / 'transkd-jax'}"
  assert pip.splitlines() == [cwd, "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
  assert main.splitlines() == [cwd, "-m", "transkd_jax.main", "--distributed=on", *args]
  # The log, followed to the end: main's output, behind a line saying when it started.
  assert "transkd_jax.main starts\nfake main: step 1\n" in proc.stdout
  assert (home / "transkd-run.exit").read_text() == "0\n"
  assert "follow it again with: gcloud compute tpus tpu-vm ssh pod-1 --zone=z --worker=0 " in (
    proc.stderr
  )


@needs_git
def test_tpu_pod_run_survives_a_dropped_connection(tmp_path):
  """The run goes on when the ssh session following its log ends (SIGHUP, then SIGTERM, to
  the script's process group), and a second start on a worker where it runs fails."""
  env = _fake_workers(tmp_path)
  environment = {k: v for k, v in os.environ.items() if k not in TPU_POD_SETTINGS}
  environment.update(env, FAKE_MAIN="block")
  args = ["--config=configs/synthetic.py", f"--workdir={tmp_path / 'run'}"]
  with open(tmp_path / "out.txt", "w") as out:
    proc = subprocess.Popen(
      ["bash", str(TPU_POD), *args],
      env=environment,
      cwd=REPO,
      stdout=out,
      stderr=out,
      start_new_session=True,
    )
  lock = tmp_path / "home" / "transkd-run.lock"
  try:
    deadline = time.monotonic() + 20
    while not (tmp_path / "gcloud.log").exists() or len(_gcloud_log(tmp_path)) < 3:
      assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "out.txt").read_text()
      time.sleep(0.02)
    assert "--worker=0" in _gcloud_log(tmp_path)[2]  # following the log
    os.killpg(proc.pid, signal.SIGHUP)  # the connection drops
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 1  # still running
    again = _tpu_pod(args, **env, FOLLOW="0")
    assert again.returncode == 1
    assert "transkd_jax.main is already running here (~/transkd-run.log)" in again.stderr
  finally:
    (tmp_path / "release").touch()
  _wait_for(tmp_path / "home" / "transkd-run.exit")
  assert (tmp_path / "home" / "transkd-run.exit").read_text() == "0\n"
  assert len(_main_calls(tmp_path)) == 1


@needs_git
@pytest.mark.parametrize("variant", ["local", "gs", "queued"])
def test_tpu_pod_watch_recreates_a_preempted_slice_and_resumes(tmp_path, variant):
  """--watch: starts the run; the slice is preempted (the run saves: "preempted"); the
  supervisor deletes and re-creates it, waits for READY, ships and starts the same command
  again, and stops once run_status.json says done."""
  env = _fake_workers(tmp_path)
  workdir = "gs://bucket/runs/r" if variant == "gs" else str(tmp_path / "runs" / "r")
  settings = dict(POLL="0", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="rt-1", SPOT="1")
  if variant == "queued":
    settings["QUEUED_RESOURCE"] = "qr-1"
  args = ["--config=configs/synthetic.py", f"--workdir={workdir}", "--mode=train"]
  env["FAKE_MAIN"] = "preempt"
  proc = _tpu_pod(["--watch", *args], **env, **settings)
  assert proc.returncode == 0, proc.stderr
  assert "the run is done (step 10 of 10)" in proc.stderr
  assert "the run stopped (preempted; step 5 of 10): starting it again" in proc.stderr
  log = _gcloud_log(tmp_path)
  kind = "queued-resources" if variant == "queued" else "tpu-vm"
  deletes = [line for line in log if line.startswith(f"gcloud compute tpus {kind} delete")]
  creates = [line for line in log if line.startswith(f"gcloud compute tpus {kind} create")]
  starts = [i for i, line in enumerate(log) if "setsid nohup" in line]
  scps = [line for line in log if " tpu-vm scp " in line]
  if variant == "queued":
    assert deletes == ["gcloud compute tpus queued-resources delete qr-1 --zone=z --force --quiet"]
    assert creates == [
      "gcloud compute tpus queued-resources create qr-1 --node-id=pod-1 --zone=z "
      "--accelerator-type=v4-8 --runtime-version=rt-1 --spot"
    ]
  else:
    assert deletes == ["gcloud compute tpus tpu-vm delete pod-1 --zone=z --quiet"]
    assert creates == [
      "gcloud compute tpus tpu-vm create pod-1 --zone=z --accelerator-type=v4-8 "
      "--version=rt-1 --spot"
    ]
  assert len(starts) == 2 and len(scps) == 2  # shipped again to the new slice
  assert starts[0] < log.index(creates[0]) < starts[1]
  calls = _main_calls(tmp_path)
  assert calls == [["-m", "transkd_jax.main", "--distributed=on", *args]] * 2
  assert (tmp_path / "home" / "transkd-jax" / "transkd_jax" / "main.py").is_file()
  if variant == "gs":
    assert "gcloud storage cat gs://bucket/runs/r/run_status.json" in log


@needs_git
def test_tpu_pod_watch_gives_up_on_a_failing_run(tmp_path):
  """A run that fails (non-zero exit) on a READY slice is started again, MAX_FAILURES times
  in a row at most; the slice is not touched."""
  env = _fake_workers(tmp_path)
  args = ["--config=configs/synthetic.py", f"--workdir={tmp_path / 'run'}"]
  proc = _tpu_pod(
    ["--watch", *args], **env, FAKE_MAIN="fail", POLL="0", MAX_FAILURES="2", ACCELERATOR_TYPE="x"
  )
  assert proc.returncode == 1, proc.stderr
  assert "the run failed (exit status per worker: 3; no run_status.json): failure 2 of 2" in (
    proc.stderr
  )
  assert "giving up after 2 failed runs in a row" in proc.stderr
  assert len(_main_calls(tmp_path)) == 2
  assert not [line for line in _gcloud_log(tmp_path) if " create " in line or " delete " in line]


def test_tpu_pod_watch_without_settings_waits_for_the_slice(tmp_path):
  """Without ACCELERATOR_TYPE and RUNTIME_VERSION a preempted slice is not re-created: the
  supervisor says so once and goes on looking."""
  env = _fake_workers(tmp_path)
  (tmp_path / "state").write_text("PREEMPTED\n")
  args = ["--config=configs/synthetic.py", f"--workdir={tmp_path / 'run'}"]
  environment = {k: v for k, v in os.environ.items() if k not in TPU_POD_SETTINGS}
  environment.update(env, POLL="0")
  with open(tmp_path / "out.txt", "w") as out:
    proc = subprocess.Popen(
      ["bash", str(TPU_POD), "--watch", *args], env=environment, cwd=REPO, stdout=out, stderr=out
    )
  try:
    deadline = time.monotonic() + 20
    while not (tmp_path / "gcloud.log").exists() or len(_gcloud_log(tmp_path)) < 5:
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.02)
  finally:
    proc.kill()
    proc.wait()
  log = _gcloud_log(tmp_path)
  assert all(" tpu-vm describe pod-1 " in line for line in log), log
  output = (tmp_path / "out.txt").read_text()
  assert output.count("slice pod-1: PREEMPTED: waiting for it to be re-created") == 1, output
  assert "ACCELERATOR_TYPE and RUNTIME_VERSION not set" in output


@pytest.mark.parametrize("queued", [False, True])
def test_tpu_pod_dry_run_watch_prints_the_supervisors_commands(queued):
  settings = dict(
    DRY_RUN="1",
    TPU_NAME="pod-1",
    ZONE="z",
    PROJECT="p",
    REPO_URL="https://example.com/x.git",
    ACCELERATOR_TYPE="v5litepod-16",
    RUNTIME_VERSION="v2-alpha-tpuv5-lite",
    SPOT="1",
    CREATE_FLAGS="--network=net --reserved",
  )
  if queued:
    settings["QUEUED_RESOURCE"] = "qr-1"
  proc = _tpu_pod(["--watch", "--workdir", "gs://b/r", "--mode=train"], **settings)
  assert proc.returncode == 0, proc.stderr
  lines = [" ".join(words) for words in _gcloud_lines(proc.stdout)]
  flags = "--zone=z --project=p"
  expected = [f"gcloud compute tpus tpu-vm describe pod-1 {flags} --format=value(state)"]
  tier = "--spot --network=net --reserved"
  if queued:
    expected += [
      f"gcloud compute tpus queued-resources describe qr-1 {flags} --format=value(state.state)",
      f"gcloud compute tpus queued-resources delete qr-1 {flags} --force --quiet",
      f"gcloud compute tpus queued-resources create qr-1 --node-id=pod-1 {flags} "
      f"--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite {tier}",
    ]
  else:
    expected += [
      f"gcloud compute tpus tpu-vm delete pod-1 {flags} --quiet",
      f"gcloud compute tpus tpu-vm create pod-1 {flags} --accelerator-type=v5litepod-16 "
      f"--version=v2-alpha-tpuv5-lite {tier}",
    ]
  expected.append("gcloud storage cat gs://b/r/run_status.json --project=p")
  assert set(expected) <= set(lines), lines
  (probe,) = [w for w in _gcloud_lines(proc.stdout) if "transkd-run: running" in " ".join(w)]
  assert "--worker=all" in probe


def test_tpu_pod_watch_needs_the_workdir():
  proc = _tpu_pod(["--watch", "--mode=train"], DRY_RUN="1", TPU_NAME="pod-1", ZONE="z")
  assert proc.returncode == 2 and "--watch needs main's --workdir" in proc.stderr
  proc = _tpu_pod(
    ["--watch", "--workdir=/x"],
    DRY_RUN="1",
    TPU_NAME="pod-1",
    ZONE="z",
    QUEUED_RESOURCE="qr",
    PREEMPTIBLE="1",
  )
  assert proc.returncode == 2 and "PREEMPTIBLE=1 is for tpu-vm create" in proc.stderr


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


def _wait_for(path, timeout=10.0):
  """Polls for a file to appear (a fake command's sign that it got somewhere)."""
  deadline = time.monotonic() + timeout
  while not Path(path).exists():
    assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
    time.sleep(0.02)


def _executables(bin_dir, scripts):
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)


# Stand-ins for SLURM's commands. srun writes its pid and arguments, then runs until
# SIGTERM (what scancel --signal=TERM delivers to the step's tasks), on which it writes
# $FAKE_ON_TERM (if set) to the workdir's run_status.json, notes that it ended and exits 0
# (FAKE_IGNORE_TERM=1: it ignores SIGTERM). scancel and scontrol record their arguments;
# scancel passes the signal on to srun; scontrol notes whether srun had ended by then.
_SLURM_FAKES = {
  "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
if [[ "${FAKE_IGNORE_TERM:-0}" == 1 ]]; then
  trap '' TERM
else
  on_term() {
    if [[ -n "${FAKE_ON_TERM:-}" ]]; then echo "$FAKE_ON_TERM" > "$FAKE_WORKDIR/run_status.json"; fi
    touch "$FAKE_DIR/srun.ended"
    exit 0
  }
  trap on_term TERM
fi
echo $$ > "$FAKE_DIR/srun.pid.tmp" && mv "$FAKE_DIR/srun.pid.tmp" "$FAKE_DIR/srun.pid"
for _ in $(seq 600); do sleep 0.05; done
exit 3
""",
  "scancel": """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.log"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
""",
  "scontrol": """#!/bin/bash
ended=srun-running
[[ -e "$FAKE_DIR/srun.ended" ]] && ended=srun-ended
echo "$* $ended" >> "$FAKE_DIR/scontrol.log"
""",
}


def _slurm_env(tmp_path, **env):
  _executables(tmp_path / "bin", _SLURM_FAKES)
  environment = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "NCCL_", "FAKE_"))
    and k not in ("JAX_LOCAL_DEVICE_IDS", "PYTHON", "MAX_REQUEUES", "SAVE_TIMEOUT")
  }
  environment.update(
    PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    SLURM_JOB_ID="4242",
    SLURM_SUBMIT_DIR=str(tmp_path),
    FAKE_DIR=str(tmp_path),
    FAKE_WORKDIR=str(tmp_path / "run"),
  )
  environment.update(env)
  return environment


def _status(status, step, total_steps=100):
  return json.dumps({"status": status, "step": step, "total_steps": total_steps})


@pytest.mark.parametrize(
  "case",
  [
    "requeue",  # USR1: the run saves (status preempted), the job is requeued
    "workdir_as_two_words",  # --workdir DIR, a second restart
    "done",  # the run finished as USR1 came: no requeue
    "max_requeues",  # requeued MAX_REQUEUES times already
    "no_progress",  # saved the step it started from
    "save_timeout",  # srun still running SAVE_TIMEOUT s after USR1: requeued anyway
  ],
)
def test_slurm_requeues_itself_at_the_time_limit(tmp_path, case):
  """USR1 (#SBATCH --signal=B:USR1@300) to the batch shell: scancel --signal=TERM to the
  job's steps, wait for srun, then scontrol requeue unless the run is done or stuck."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  env = {}
  on_term = _status("preempted", 7)
  workdir_args = [f"--workdir={workdir}"]
  if case == "workdir_as_two_words":
    workdir_args = ["--workdir", str(workdir)]
    env["SLURM_RESTART_COUNT"] = "2"
  elif case == "done":
    on_term = _status("done", 100)
  elif case == "max_requeues":
    env.update(SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
  elif case == "no_progress":
    (workdir / "run_status.json").write_text(_status("preempted", 7))
  elif case == "save_timeout":
    env.update(FAKE_IGNORE_TERM="1", SAVE_TIMEOUT="1")
  environment = _slurm_env(tmp_path, FAKE_ON_TERM=on_term, **env)
  args = ["--config=configs/synthetic.py", *workdir_args, "--mode=train"]
  # Output to a file, not a pipe: a fake srun left running (save_timeout) keeps a pipe open.
  with open(tmp_path / "out.txt", "w") as out:
    proc = subprocess.Popen(
      ["bash", str(SLURM), *args], env=environment, cwd=tmp_path, stdout=out, stderr=out
    )
  try:
    _wait_for(tmp_path / "srun.pid")  # srun started, so the USR1 trap is set
    os.kill(proc.pid, signal.SIGUSR1)
    proc.wait(timeout=20)
  finally:
    proc.kill()
    if (tmp_path / "srun.pid").exists():  # the fake srun that ignores SIGTERM
      subprocess.run(["kill", "-KILL", (tmp_path / "srun.pid").read_text()], capture_output=True)
  stderr = (tmp_path / "out.txt").read_text()
  assert (tmp_path / "srun.args").read_text().splitlines()[-len(args) :] == args
  assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 4242\n"
  scontrol_log = tmp_path / "scontrol.log"
  requeued = scontrol_log.read_text() if scontrol_log.exists() else None
  restart = env.get("SLURM_RESTART_COUNT", "0")
  assert f"restart {restart} (requeued at most {env.get('MAX_REQUEUES', '20')} times)" in stderr
  if case in ("requeue", "workdir_as_two_words"):
    assert proc.returncode == 0, stderr
    assert requeued == "requeue 4242 srun-ended\n"  # after the run saved
    assert f"requeueing (restart {int(restart) + 1}) at step 7 of 100" in stderr
  elif case == "save_timeout":
    assert proc.returncode == 0, stderr
    assert requeued == "requeue 4242 srun-running\n"
    assert "still running 1 s after USR1 (SAVE_TIMEOUT)" in stderr
  else:
    assert requeued is None
    assert proc.returncode == (0 if case == "done" else 1), stderr
    reason = {
      "done": "the run is done: not requeued",
      "max_requeues": "restarted 3 times already (MAX_REQUEUES=3): not requeued",
      "no_progress": "no step completed in this job (still at step 7): not requeued",
    }[case]
    assert reason in stderr


def test_slurm_without_usr1_exits_with_sruns_status(tmp_path):
  """No USR1: the script waits for srun and exits with its status; nothing is requeued."""
  environment = _slurm_env(tmp_path)
  (tmp_path / "bin" / "srun").write_text("#!/bin/bash\nsleep 0.2\nexit 3\n")
  proc = subprocess.run(
    ["bash", str(SLURM), f"--workdir={tmp_path}"],
    env=environment,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=20,
  )
  assert proc.returncode == 3, proc.stderr
  assert not (tmp_path / "scancel.log").exists() and not (tmp_path / "scontrol.log").exists()


def test_slurm_sbatch_lines_ask_for_requeue_and_a_signal():
  lines = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
  assert {"#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"} <= set(
    lines
  )
