"""Tests of the image-folder source: class folders, flat folders, file lists, 16-bit TIFF, bad files."""

import logging
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxembed.configs import common
from jaxembed import data
from jaxembed.data import folder
from jaxembed.data import streaming


def cfg(**kw):
  c = ml_collections.ConfigDict(common.get_config().data.to_dict())
  c.source = "folder"
  c.image_size = 0
  c.test_fraction = 0.0
  c.update(kw)
  return c


def save(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
  return array


def rand(seed, shape, dtype=np.uint8, high=256):
  return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def test_class_subfolders_become_labels(tmp_path):
  images = {}
  for c, name in enumerate(["benign", "malignant"]):
    for i in range(4):
      images[f"{name}/{i}.png"] = save(tmp_path / name / f"{i}.png", rand(10 * c + i, (6, 6, 3)))
  save(tmp_path / "malignant" / "nested" / "x.jpg", rand(99, (6, 6, 3)))
  (tmp_path / "benign" / "notes.txt").write_text("not an image")
  ds = data.load(cfg(path=str(tmp_path)))
  assert ds.train_images.shape == (9, 6, 6, 3) and ds.class_names == ("benign", "malignant")
  np.testing.assert_array_equal(ds.train_labels, [0] * 4 + [1] * 5)
  i = list(ds.train_ids).index(str(tmp_path / "malignant" / "2.png"))
  np.testing.assert_array_equal(ds.train_images[i], images["malignant/2.png"])  # PNG is lossless
  ds = data.load(cfg(path=str(tmp_path), test_fraction=0.25))
  assert len(ds.train_images) + len(ds.test_images) == 9 and len(ds.test_images) == 3
  assert set(ds.test_labels) == {0, 1}  # stratified


def test_flat_folder_and_file_list_are_unlabelled(tmp_path):
  for i in range(3):
    save(tmp_path / "flat" / f"{i}.png", rand(i, (5, 5)))
  ds = data.load(cfg(path=str(tmp_path / "flat")))
  assert ds.train_images.shape == (3, 5, 5, 1) and (ds.train_labels == -1).all()
  lst = tmp_path / "list.txt"
  lst.write_text(f"# two images\nflat/2.png\n\n{tmp_path / 'flat' / '0.png'}\n")
  ds = data.load(cfg(path=str(lst)))
  assert list(ds.train_ids) == [str(tmp_path / "flat" / "2.png"), str(tmp_path / "flat" / "0.png")]
  np.testing.assert_array_equal(ds.train_images[0, ..., 0], rand(2, (5, 5)))


def test_16_bit_tiff_and_png_scaled_by_dataset_minmax(tmp_path):
  a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
  b = np.array([[5000, 9000], [1000, 1000]], np.uint16)
  Image.fromarray(a).save(tmp_path / "a.tif")
  Image.fromarray(b).save(tmp_path / "b.png")
  ds = data.load(cfg(path=str(tmp_path)))
  assert ds.intensity_range == (1000.0, 9000.0)
  by_id = dict(zip([p.rsplit("/", 1)[1] for p in ds.train_ids], ds.train_images[..., 0]))
  # 255 * (v - 1000) / 8000, halves rounded up: 2000 -> 31.875, 3000 -> 63.75, 5000 -> 127.5.
  np.testing.assert_array_equal(by_id["a.tif"], [[0, 32], [64, 128]])
  np.testing.assert_array_equal(by_id["b.png"], [[128, 255], [0, 0]])
  ds = data.load(cfg(path=str(tmp_path), intensity="window", window=(1000, 3000)))
  by_id = dict(zip([p.rsplit("/", 1)[1] for p in ds.train_ids], ds.train_images[..., 0]))
  np.testing.assert_array_equal(by_id["a.tif"], [[0, 128], [255, 255]])


def test_float_tiff(tmp_path):
  Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)).save(tmp_path / "f.tif")
  ds = data.load(cfg(path=str(tmp_path)))
  np.testing.assert_array_equal(ds.train_images[0, ..., 0], [[0, 128], [64, 255]])


def test_mixed_sizes_and_modes(tmp_path):
  save(tmp_path / "a.png", rand(0, (6, 6)))
  save(tmp_path / "b.png", rand(1, (8, 5, 3)))
  with pytest.raises(data.DataError, match="mixes gray and RGB.*data.channels"):
    data.load(cfg(path=str(tmp_path)))
  with pytest.raises(data.DataError, match="mixes image sizes.*data.image_size"):
    data.load(cfg(path=str(tmp_path), channels=3))
  ds = data.load(cfg(path=str(tmp_path), channels=3, image_size=4))
  assert ds.train_images.shape == (2, 4, 4, 3)
  # Gray -> RGB repeats the plane; the resize is PIL's bilinear.
  gray = np.asarray(Image.fromarray(rand(0, (6, 6))).resize((4, 4), Image.BILINEAR))
  np.testing.assert_array_equal(ds.train_images[0], np.repeat(gray[..., None], 3, -1))


def test_rgb_to_gray_matches_pil(tmp_path):
  rgb = save(tmp_path / "c.png", rand(3, (7, 7, 3)))
  ds = data.load(cfg(path=str(tmp_path), channels=1))
  pil = np.asarray(Image.fromarray(rgb).convert("L"))
  assert np.abs(ds.train_images[0, ..., 0].astype(int) - pil).max() <= 1


def test_palette_and_alpha_images(tmp_path):
  rgba = rand(4, (5, 5, 4))
  save(tmp_path / "rgba.png", rgba)
  Image.fromarray(rand(5, (5, 5, 3))).convert("P").save(tmp_path / "p.png")
  ds = data.load(cfg(path=str(tmp_path)))
  assert ds.train_images.shape == (2, 5, 5, 3)
  np.testing.assert_array_equal(ds.train_images[list(ds.train_ids).index(
      str(tmp_path / "rgba.png"))], rgba[..., :3])


@pytest.mark.parametrize("threads", ["1", "3"])
def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog, capsys, monkeypatch,
                                                     threads):
  monkeypatch.setenv(folder.THREADS_ENV, threads)
  for i in range(3):
    save(tmp_path / f"{i}.png", rand(i, (4, 4)))
  for i in range(7):
    (tmp_path / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
  with caplog.at_level(logging.WARNING):
    ds = data.load(cfg(path=str(tmp_path)))
  assert len(ds.train_images) == 3
  out = capsys.readouterr().out
  assert "skipped 7 of 10 image files" in out and "bad0.jpg" in out and ", ..." in out
  assert "skipped 7 of 10" in caplog.text
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(b"")
  with pytest.raises(data.DataError, match="none of the 10 image files could be read"):
    data.load(cfg(path=str(tmp_path)))


def test_folder_bad_inputs(tmp_path):
  with pytest.raises(data.DataError, match="no such file or folder"):
    data.load(cfg(path=str(tmp_path / "missing")))
  with pytest.raises(data.DataError, match="needs --config.data.path"):
    data.load(cfg())
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match="no image files"):
    data.load(cfg(path=str(tmp_path / "empty")))
  save(tmp_path / "cls" / "a" / "0.png", rand(0, (4, 4)))
  (tmp_path / "cls" / "b").mkdir()
  with pytest.raises(data.DataError, match="class folder .*b' has no image files"):
    data.load(cfg(path=str(tmp_path / "cls")))
  save(tmp_path / "mixed" / "a" / "0.png", rand(0, (4, 4)))
  save(tmp_path / "mixed" / "top.png", rand(0, (4, 4)))
  with pytest.raises(data.DataError, match="both image files .* and subfolders"):
    data.load(cfg(path=str(tmp_path / "mixed")))
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(data.DataError, match="names no images"):
    data.load(cfg(path=str(tmp_path / "empty.txt")))


def mixed_folder(root):
  """JPEG, PNG and 16-bit TIFF files, gray and RGB, of several sizes, and two unreadable files."""
  rng = np.random.default_rng(7)
  for i in range(40):
    shape = (12 + i % 5, 9 + i % 3) + (() if i % 4 == 0 else (3,))
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    kind = ("jpg", "png", "tif")[i % 3]
    if kind == "tif":
      pixels = rng.integers(100, 40000, shape[:2]).astype(np.uint16)
    save(root / f"c{i % 2}" / f"{i:02d}.{kind}", pixels)
  for i in (5, 30):
    (root / f"c{i % 2}" / f"{i:02d}b.png").write_bytes(b"not a png")
  return root


@pytest.mark.parametrize("kw", [dict(channels=3, image_size=8), dict(channels=1, image_size=5)])
def test_parallel_decoding_equals_sequential(tmp_path, kw):
  paths, _, _ = folder.list_images(str(mixed_folder(tmp_path)))
  c = cfg(path=str(tmp_path), **kw)
  one = folder.read_files(paths, c, threads=1)
  for threads in (2, 8):
    many = folder.read_files(paths, c, threads=threads)
    np.testing.assert_array_equal(many[0], one[0])  # same rows in the same order, bit for bit
    np.testing.assert_array_equal(many[1], one[1])
    assert many[2] == one[2] and one[2] is not None  # one range over every 16-bit file
  assert len(one[1]) == 40 and one[0].shape == (40,) + (kw["image_size"],) * 2 + (kw["channels"],)
  # Each row is the file on its own through prepare(), with the range over all files.
  for row, i in ((0, one[1][0]), (13, one[1][13]), (39, one[1][39])):
    np.testing.assert_array_equal(
        one[0][row], folder.prepare(folder.read_image(paths[i]), c, one[2]))


def test_streamed_share_equals_the_in_memory_load(tmp_path):
  mixed_folder(tmp_path)
  for i in (5, 30):
    (tmp_path / f"c{i % 2}" / f"{i:02d}b.png").unlink()
  c = cfg(path=str(tmp_path), channels=1, image_size=6, test_fraction=0.25)
  ds, share = data.load(c), streaming.load_process_share(c)
  np.testing.assert_array_equal(share.train_images, ds.train_images)
  np.testing.assert_array_equal(share.test_images, ds.test_images)
  np.testing.assert_array_equal(share.train_ids, ds.train_ids)
  assert share.intensity_range == ds.intensity_range
  np.testing.assert_array_equal(share.all_images()[[0, len(ds.train_images)]],
                                ds.all_images()[[0, len(ds.train_images)]])


def test_progress_line_text(capsys):
  now = [0.0]
  p = folder.Progress(30_000, "image files", every=5.0, clock=lambda: now[0])
  now[0] = 4.0
  p.update(10_000)
  assert capsys.readouterr().out == ""
  now[0] = 5.0
  p.update(12_000)
  now[0] = 7.0
  p.update(13_000)  # 2 s after the last line: silent
  now[0] = 12.0
  p.update(30_000)  # done: the final line says so
  p.finish(30_000)
  assert capsys.readouterr().out.splitlines() == [
      "reading image files: 12,000 of 30,000 (2,400 files/s, 8 s left)",
      "read 30,000 image files in 12 s (2,500 files/s)"]


def test_progress_lines_while_reading_and_none_for_a_quick_folder(tmp_path, capsys):
  for i in range(6):
    save(tmp_path / f"{i}.png", rand(i, (4, 4, 3)))
  paths, _, _ = folder.list_images(str(tmp_path))
  folder.read_files(paths, cfg(), threads=2)
  assert capsys.readouterr().out == ""  # default interval: a quick folder prints nothing
  folder.read_files(paths, cfg(), threads=2, progress_every=0.0)
  out = capsys.readouterr().out.splitlines()
  assert re.fullmatch(r"reading image files: [1-5] of 6 \([\d,]+ files/s, [\d,]+ s left\)", out[0])
  assert out[-1].startswith("read 6 image files in ")


def test_decode_threads_from_the_environment(monkeypatch):
  monkeypatch.setenv(folder.THREADS_ENV, "3")
  assert folder.decode_threads() == 3
  monkeypatch.delenv(folder.THREADS_ENV)
  assert folder.decode_threads() >= 1
  monkeypatch.setenv(folder.THREADS_ENV, "zero")
  with pytest.raises(data.DataError, match="JAXEMBED_DECODE_THREADS='zero'.*>= 1"):
    folder.decode_threads()
