"""python -m transkd_jax.data.browse: one example as the loss or the evaluation sees it."""

import numpy as np
from PIL import Image
from runs import REPO

from transkd_jax.data import browse
from transkd_jax.data.datasets import make_source


def _args(data_root, outdir, *extra):
  return [
    "browse",
    f"--config={REPO / 'configs' / 'synthetic.py'}",
    f"--config.data.root={data_root}",
    "--config.data.num_train=4",
    "--config.data.num_val=2",
    "--config.data.generated_size=(64,128)",
    "--config.image_size=(64,128)",
    f"--outdir={outdir}",
    *extra,
  ]


def test_val_label_is_pil_nearest_at_a_quarter_under_the_reference_protocol(tmp_path, capsys):
  assert (
    browse.cli(
      _args(
        tmp_path / "data",
        tmp_path / "out",
        "--split=val",
        "--index=1",
        "--config.eval_protocol=reference",
      )
    )
    == 0
  )
  written = capsys.readouterr().out.split()
  assert [p.rsplit("_", 1)[-1] for p in written] == ["image.png", "label.png", "overlay.png"]
  image, label, overlay = (np.asarray(Image.open(p)) for p in written)
  assert image.shape == overlay.shape == (64, 128, 3) and label.shape == (16, 32, 3)
  # The label the evaluation scores: the stored one by PIL NEAREST at 1/4 of the input.
  from runs import load_config

  config = load_config(REPO / "configs" / "synthetic.py")
  config.data.update(root=str(tmp_path / "data"), num_train=4, num_val=2, generated_size=(64, 128))
  config.image_size, config.eval_protocol = (64, 128), "reference"
  stored = make_source(config.data, "val")[1]["label"]
  expected = np.asarray(Image.fromarray(stored).resize((32, 16), Image.NEAREST))
  np.testing.assert_array_equal(browse.view(config, "val", 1)["label"], expected)
  # The label picture is that label in the palette (one colour per class).
  colours = browse.pictures(browse.view(config, "val", 1), browse.classes.palette(config.data, 19))
  np.testing.assert_array_equal(label, colours["label"])


def test_train_view_and_named_errors(tmp_path, capsys):
  assert browse.cli(_args(tmp_path / "data", tmp_path / "out", "--split=train")) == 0
  assert len(capsys.readouterr().out.split()) == 3
  assert browse.cli(_args(tmp_path / "data", tmp_path / "out", "--index=9")) == 2
  assert "--index=9: the val split holds 2 examples" in capsys.readouterr().err
  assert browse.cli(["browse", f"--outdir={tmp_path}"]) == 2
  assert "no config" in capsys.readouterr().err
