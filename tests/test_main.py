"""The entry point: --mode=info output, overrides, and user errors."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CITYSCAPES = f"--config={REPO / 'configs' / 'cityscapes.py'}"


def _main(*args, cwd=None):
  return subprocess.run(
    [sys.executable, "-m", "transkd_jax.main", *args],
    capture_output=True,
    text=True,
    cwd=cwd or REPO,
    timeout=300,
  )


def test_info_writes_sizes(tmp_path):
  result = _main(
    CITYSCAPES, f"--workdir={tmp_path}", "--mode=info", "--config.image_size=(128, 256)"
  )
  assert result.returncode == 0, result.stderr
  info = json.loads((tmp_path / "info.json").read_text())
  assert info["teacher"]["params"] == 27_361_235
  assert info["student"]["params"] == 3_719_027
  assert info["input_size"] == [128, 256]
  # FLOPs scale with pixels; at 128x256 (1/16 of 512x1024) B2 is ~6 GFLOPs (the head
  # fuses each stage before upsampling: the same function with ~1/3 of the FLOPs).
  assert 4 < info["teacher"]["gflops"] < 25
  assert info["student"]["gflops"] < info["teacher"]["gflops"] / 5
  assert "SegFormer-B2" in result.stdout
  # The model zoo's multiply-adds (tests/test_macs.py): 1/16 of 512x1024's at 19 classes,
  # and the paper's "> 85 %" reduction from B2 to B0.
  assert (info["teacher"]["zoo_gmacs"], info["student"]["zoo_gmacs"]) == (7.114, 0.854)
  assert info["reduction"]["zoo_gmacs"] == pytest.approx(1 - 854_099_968 / 7_113_527_296, abs=1e-3)
  assert "SegFormer-B2 -> SegFormer-B0: 86.4 % fewer parameters" in result.stdout
  assert "88.0 % fewer zoo GMACs" in result.stdout
  # The configured method's training-time wrapper: the 19-class B0 + CSF + PEA
  # (the public code's 4,563,124 counts a 20-way head: 257 more weights).
  assert info["distiller"]["method"] == "transkd_base"
  assert info["distiller"]["params"] == 4_563_124 - 257
  assert info["student"]["gflops"] < info["distiller"]["gflops"] < info["teacher"]["gflops"]


def _info(config_file, tmp_path, **overrides):
  """run_info in this process (the command line is test_info_writes_sizes')."""
  from runs import load_config

  from transkd_jax.config import validate_config
  from transkd_jax.info import run_info

  config = load_config(REPO / "configs" / config_file)
  config.update(overrides)
  validate_config(config)
  run_info(config, str(tmp_path))
  return json.loads((tmp_path / "info.json").read_text())


def test_info_distiller_follows_the_method(tmp_path):
  info = _info(
    "cityscapes.py",
    tmp_path,
    image_size=(64, 128),
    method="transkd_ea",
    num_classes=20,
    class_weights=(),
  )
  assert info["distiller"]["params"] == 5_534_076


# The public code's models and training-time wrappers, counted by instantiating them
# (train/models/pvtv2/pvtv2.py build_pvts, train/models/lvt/backbone.py lvt(rasa_cfg),
# and train/CSF.py build_kd_trans(student, 5, channels) as train_TransKDBase_PVTv2B2B0.py
# and train_TransKDBase_SegformerB2LVT.py call it) at 20 classes, less the head's weights
# for the 20th class: 128 + 1 (PVTv2's 128-wide FPN head), 256 + 1 (LVT's 256-wide head).
@pytest.mark.parametrize(
  "config,teacher,student,distiller,names",
  [
    (
      "cityscapes_pvtv2.py",
      29_098_836 - 129,
      7_527_668 - 129,
      8_371_508 - 129,
      ("PVTv2-B2", "PVTv2-B0"),
    ),
    (
      "cityscapes_lvt.py",
      27_362_004 - 769,
      3_837_176 - 257,
      4_685_112 - 257,
      ("SegFormer-B2", "LVT"),
    ),
  ],
)
def test_info_of_the_other_pairs_counts_the_public_models(
  tmp_path, capsys, config, teacher, student, distiller, names
):
  info = _info(config, tmp_path, image_size=(64, 128))
  assert (info["teacher"]["params"], info["student"]["params"], info["distiller"]["params"]) == (
    teacher,
    student,
    distiller,
  )
  assert (info["teacher"]["model"], info["student"]["model"]) == names
  out = capsys.readouterr().out
  assert all(name in out for name in names)


# One override the flag parser refuses and one validate_config refuses (the others are
# named in tests/test_config.py, in-process).
@pytest.mark.parametrize(
  "override,needle",
  [
    ("--config.no_such_key=1", "--config.no_such_key"),
    ("--config.num_classes=21", "config.class_weights has 19 entries"),
  ],
)
def test_bad_config_is_one_clear_error(tmp_path, override, needle):
  result = _main(CITYSCAPES, f"--workdir={tmp_path}", override)
  assert result.returncode == 2
  assert needle in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_workdir_is_named(tmp_path):
  result = _main(CITYSCAPES)
  assert result.returncode == 2
  assert "--workdir" in result.stderr


def test_recipe_is_a_mode(tmp_path):
  """It starts like every mode (validation, then jax.distributed) and names bad input."""
  for command in (["-m", "transkd_jax.main", "--mode=recipe"],):
    result = subprocess.run(
      [
        sys.executable,
        *command,
        CITYSCAPES,
        f"--workdir={tmp_path}",
        "--config.recipe.methods=('student','nope')",
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown distillation method 'nope'" in result.stderr


def test_a_cpu_start_prints_no_tpu_initialisation_noise():
  """The test extra installs libtpu; on a machine without a TPU or GPU a start stays quiet."""
  import glob
  import importlib.util
  import os

  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: nothing to initialise")
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia*"):
    pytest.skip("an accelerator is present")
  environment = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import transkd_jax.main, jax; print(jax.devices())"
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert "CpuDevice" in result.stdout
  assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr
