"""A disk that fills up at one checkpoint, for tests (not a test module itself).

``python tests/full_disk.py STEP ARGS...`` runs ``python -m jaxembed.train ARGS...`` with the
saving of checkpoint STEP failing as on a full disk; :func:`full_disk_at` does the same in
process (monkeypatch ``tensorstore.open`` with it).
"""

import json
import sys

import tensorstore as ts

UNFINISHED = ".orbax-checkpoint-tmp"


def full_disk_at(step, real_open=ts.open):
  """A ``tensorstore.open`` that fails like a full disk for the arrays of checkpoint ``step``.

  Orbax writes every array through ``ts.open(spec, create=True, ...)`` (looked up when
  called), from its background threads; the error is the one TensorStore raised when a tmpfs
  filled up during a save (issue #22).
  """

  def fake_open(spec, *args, **kwargs):
    text = json.dumps(spec.to_json() if hasattr(spec, "to_json") else spec)
    if kwargs.get("create") and f"/{step}{UNFINISHED}/" in text:
      async def fail():
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"w/.zarray\": Failed to write 175 "
                         "bytes to file 16: No space left on device "
                         "[tensorstore_spec='{\"driver\": \"zarr\"}'] [os_error_code=28]")
      return fail()
    return real_open(spec, *args, **kwargs)
  return fake_open


if __name__ == "__main__":
  ts.open = full_disk_at(int(sys.argv.pop(1)))
  from jaxembed import train  # pylint: disable=g-import-not-at-top  # after the patch
  train.run()
