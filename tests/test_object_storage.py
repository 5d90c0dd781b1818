"""A workdir on object storage: train, kill, resume and sample with --workdir=gs://bucket/run.

A Google Cloud Storage emulator (the gcp-storage-emulator package, in memory) serves the GCS API
on localhost; the runs are the real command line in subprocesses whose storage clients point at
it (tensorstore for orbax's arrays, gcsfs for everything else). Nothing leaves the machine.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_imagenet_latents import imagenet_latents  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """(server, environment of the clients) for an in-memory emulator with one bucket."""
  from http import HTTPStatus

  from gcp_storage_emulator import server as emulator_server, storage as emulator_storage
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def move_to(request, response, store):
    """objects.moveTo (what gcsfs renames with), which the emulator lacks: copy, then delete."""
    bucket, params = request.params["bucket_name"], request.params
    try:
      response.json(objects._copy(request.base_url, store, bucket, params["object_id"], bucket,
                                  params["dest_object_id"]))
      store.delete_file(bucket, params["object_id"])
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND

  original_download = objects.download

  def download(request, response, store, *args, **kwargs):
    """Downloads with the object's generation in x-goog-generation, as GCS sends it (tensorstore
    reads it to cache and to make conditional writes; the emulator leaves it out)."""
    original_download(request, response, store, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = store.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  completed = {}
  original_finalize, original_upload_partial = (objects._finalize_resumable_object,
                                                objects.upload_partial)

  def finalize(response, storage, obj, data, upload_id):
    original_finalize(response, storage, obj, data, upload_id)
    completed[upload_id] = obj

  def upload_partial(request, response, storage, *args, **kwargs):
    """A repeated final chunk of a finished resumable upload answers with the object, as GCS does
    (the emulator forgets the session and answers 404; a client retries a chunk whose answer came
    too late, as a loaded machine makes happen)."""
    upload_id = request.query.get("upload_id", [None])[0]
    if upload_id in completed:
      response.json(completed[upload_id])
      return
    original_upload_partial(request, response, storage, *args, **kwargs)

  route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
           r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  replaced = {original_download: download, original_upload_partial: upload_partial}
  serving = threading.Lock()

  def one_at_a_time(handler):
    """The handler under one lock for the whole emulator, its request body read before: its
    storage is plain dicts, which requests served side by side would change while another
    iterates over them (a listing, or the JSON dump of every write), and a request that fails so
    closes its connection unanswered; and a client's retry of a chunk would race its first try
    (refused with 400, its range already received)."""
    def handle(request, response, *args, **kwargs):
      try:
        request.data  # noqa: B018 (reads the body: a slow client does not hold up the others)
        with serving:
          return handler(request, response, *args, **kwargs)
      except Exception:  # answered (500, which clients retry), not a connection closed unanswered
        logging.getLogger(__name__).exception("emulator: %s %s", request.method, request.path)
        response.status = HTTPStatus.INTERNAL_SERVER_ERROR
    return handle

  handlers = tuple((pattern, {method: one_at_a_time(replaced.get(handler, handler))
                              for method, handler in methods.items()})
                   for pattern, methods in ((route, {"POST": move_to}),)
                   + emulator_server.HANDLERS)
  threading_server = emulator_server.server.ThreadingHTTPServer
  with pytest.MonkeyPatch.context() as patch:  # undone when the module's tests are done
    patch.setattr(objects, "_finalize_resumable_object", finalize)
    # Chunks come as PUT (tensorstore) or as POST to the session (gcsfs), which the emulator
    # forwards to objects.upload_partial by its module-level name (under the lock already).
    patch.setattr(objects, "upload_partial", upload_partial)
    patch.setattr(objects, "download", download)  # objects.get calls it for ?alt=media
    # Uploads POSTed to .../o without the /upload prefix reach objects.insert by its name.
    patch.setattr(objects, "insert", one_at_a_time(objects.insert))
    patch.setattr(emulator_server, "HANDLERS", handlers)
    # In memory, nothing reads the emulator's .meta file back, which it rewrote (every object's
    # metadata as JSON) on every write: a run's hundreds of checkpoint files made each write slow.
    patch.setattr(emulator_storage.Storage, "_write_config_to_file", lambda self: None)
    # One thread per connection (the emulator serves one at a time, and tensorstore's parallel
    # uploads then stall behind a slow client); dict-backed in-memory storage.
    patch.setattr(emulator_server.server, "HTTPServer", threading_server)
    patch.setattr(threading_server, "daemon_threads", True)
    patch.setattr(threading_server, "handle_error", lambda *args: None)  # cancelled requests
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # expected 404s
    port = _free_port()
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                           default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    environment = dict(
        os.environ,
        TENSORSTORE_GCS_HTTP_URL=url,            # orbax's arrays (tensorstore's gcs driver)
        GOOGLE_AUTH_TOKEN_FOR_TESTING="test",    # tensorstore: no credential search
        STORAGE_EMULATOR_HOST=url,               # gcsfs and google-cloud-storage
        CLOUD_STORAGE_EMULATOR_ENDPOINT=url,     # array_record's own GCS reader (dataset shards)
        FSSPEC_GCS_TOKEN="anon",                 # gcsfs: no credential search
        NO_GCE_CHECK="true",                     # never probe the GCE metadata server
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no gRPC bucket-type probe
        EPATH_USE_TF="false",                    # etils.epath through fsspec/gcsfs
        JAX_PLATFORMS="cpu")
    yield server, environment
    server.stop()


LIST_SCRIPT = """
import json, sys
import gcsfs
fs = gcsfs.GCSFileSystem()
root = sys.argv[1][len('gs://'):].rstrip('/')
found = fs.find(root)
files = sorted(name[len(root) + 1:] for name in found)
metrics = fs.cat(root + '/metrics.jsonl').decode() if root + '/metrics.jsonl' in found else ''
print(json.dumps({'files': files, 'metrics': metrics}))
"""


UPLOAD_SCRIPT = """
import sys
import gcsfs
gcsfs.GCSFileSystem().put(sys.argv[1], sys.argv[2][len('gs://'):], recursive=True)
"""


def upload(environment, local, target):
  """Copies the local directory `local` to gs://... `target` in the emulator."""
  done = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, str(local), target],
                        env=environment, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]


def bucket_listing(environment, root):
  done = subprocess.run([sys.executable, "-c", LIST_SCRIPT, root], env=environment,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def command(workdir, *overrides, mode="train"):
  return [sys.executable, "-m", "flowjax.main", "--config=experiments/quickstart.py:tiny",
          f"--workdir={workdir}", "--num_cpu_devices=1", f"--mode={mode}",
          "--config.sample.every_steps=0", "--config.ckpt.every_steps=2",
          "--config.ckpt.async_save=False", "--config.train.log_every=1", *overrides]


@pytest.mark.parametrize("method,overlap", [("POST", False), ("PUT", False), ("POST", True),
                                            ("PUT", True)])
def test_the_emulator_answers_a_repeated_final_chunk_with_the_object(emulator, monkeypatch,
                                                                     method, overlap):
  """A client that retries the final chunk of a resumable upload (its first answer came too late,
  or the first try is still being served) gets the object back, as from GCS: gcsfs sends chunks
  as POST, tensorstore as PUT."""
  import urllib.request
  from concurrent import futures

  from gcp_storage_emulator.handlers import objects
  _, environment = emulator
  url = environment["STORAGE_EMULATOR_HOST"]
  name = f"retried/{method}-{overlap}.txt"
  start = urllib.request.Request(
      f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name={name}",
      data=json.dumps({"name": name}).encode(), method="POST",
      headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(start, timeout=30) as answer:
    session = answer.headers["Location"]
  body = b"0123456789"

  def send(_):
    chunk = urllib.request.Request(session, data=body, method=method, headers={
        "Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}",
        "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(chunk, timeout=30) as answer:
      return answer.status, json.loads(answer.read())

  if overlap:  # the retry arrives while the first try is still finishing the object
    finish = objects._finalize_resumable_object

    def slow_finish(*args):
      time.sleep(1.0)
      finish(*args)

    monkeypatch.setattr(objects, "_finalize_resumable_object", slow_finish)
    with futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(send, 0)
      time.sleep(0.3)
      retry = pool.submit(send, 1)
      answers = [first.result(), retry.result()]
  else:
    answers = [send(0), send(1)]
  assert [status for status, _ in answers] == [200, 200], answers
  assert answers[0][1]["name"] == answers[1][1]["name"] == name
  assert answers[0][1]["size"] == answers[1][1]["size"] == str(len(body))


def test_the_emulator_serves_many_writers_at_once(emulator):
  """Writers side by side (a checkpoint's files, tensorstore's parallel chunks) each get their
  answer: the emulator's storage is not changed under a request that iterates over it."""
  import urllib.request
  from concurrent import futures
  _, environment = emulator
  url = environment["STORAGE_EMULATOR_HOST"]

  def write(k):
    name = f"many/{k // 100}/{k % 100}.bin"
    request = urllib.request.Request(
        f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}",
        data=bytes(k % 251 for _ in range(64)), method="POST",
        headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as answer:
      return answer.status, json.loads(answer.read())["name"]

  with futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(write, range(800)))
  assert answers == [(200, f"many/{k // 100}/{k % 100}.bin") for k in range(800)]


def test_an_emulator_error_is_answered_with_500(emulator, monkeypatch):
  """A request the emulator fails on is answered (500, which clients retry) instead of closing
  its connection unanswered."""
  import urllib.error
  import urllib.request

  from gcp_storage_emulator import storage as emulator_storage
  _, environment = emulator

  def fail(*args, **kwargs):
    raise RuntimeError("planted")

  monkeypatch.setattr(emulator_storage.Storage, "get_file_obj", fail)
  url = f"{environment['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/anything"
  with pytest.raises(urllib.error.HTTPError) as error:
    urllib.request.urlopen(url, timeout=30)
  assert error.value.code == 500


def test_train_kill_resume_and_sample_in_a_bucket(emulator, tmp_path):
  """A run in the bucket is killed, resumed and sampled, and then distilled from (a teacher in
  the bucket)."""
  _, environment = emulator
  workdir = f"gs://{BUCKET}/run"
  # Train a long run and kill it (SIGKILL: no clean-up) once its step-4 checkpoint is committed.
  log = open(tmp_path / "killed_run.log", "w")
  run = subprocess.Popen(command(workdir, "--config.train.steps=100000"), cwd=ROOT,
                         env=environment, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  try:
    while True:
      files = bucket_listing(environment, workdir)["files"]
      if "checkpoints/4/commit_success.txt" in files:
        break
      assert run.poll() is None, (tmp_path / "killed_run.log").read_text()[-3000:]
      assert time.time() < deadline, ("no checkpoint at step 4 in the bucket after 240 s:\n"
                                       + (tmp_path / "killed_run.log").read_text()[-3000:])
      time.sleep(0.5)
  finally:
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    log.close()
  listing = bucket_listing(environment, workdir)
  assert "config.json" in listing["files"]
  assert not any(name.startswith("gs:") for name in os.listdir(ROOT))  # no local ./gs:/ folder
  # The killed run may have committed later checkpoints before the kill landed (a fast machine
  # trains several steps per poll): resume from the newest and train 4 steps past it.
  # A step is committed once its own checkpoints/N/commit_success.txt exists; its items' markers
  # (checkpoints/N/ITEM/commit_success.txt) are written earlier, so a kill can leave those alone.
  committed = [int(name.split("/")[1]) for name in listing["files"]
               if re.fullmatch(r"checkpoints/\d+/commit_success\.txt", name)]
  newest = max(committed)
  assert newest >= 4, committed
  last = newest + 4
  done = subprocess.run(command(workdir, f"--config.train.steps={last}"), cwd=ROOT,
                        env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from gs://bucket/run/checkpoints at step" in done.stderr, done.stderr[-4000:]
  resumed_at = int(done.stderr.split("Resumed from gs://bucket/run/checkpoints at step ")[1]
                   .split(".")[0])
  assert resumed_at == newest, (resumed_at, committed)
  done = subprocess.run(command(workdir, f"--config.train.steps={last}", mode="sample"),
                        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  listing = bucket_listing(environment, workdir)
  files = set(listing["files"])
  assert {"config.json", "samples/final.png", "samples/final.npz"} <= files
  assert any(name.startswith(f"checkpoints/{last}/") for name in files)
  assert any(name.startswith("tensorboard/events.out.tfevents") for name in files)
  steps = [json.loads(line)["step"] for line in listing["metrics"].splitlines()]
  # One record per step, in order: the records reach the bucket with each checkpoint (its own
  # step included), and those the killed run logged after its last checkpoint were dropped.
  assert steps == list(range(1, last + 1)), steps
  # objective.teacher_workdir=gs://...: a CTM student (local workdir) reads this run, its
  # flow-matching teacher, config and weights from the bucket, as orbax reads any workdir there.
  student = [sys.executable, "-m", "flowjax.main", "--config=experiments/ctm_digits.py:tiny",
             f"--workdir={tmp_path / 'student'}", "--num_cpu_devices=1",
             f"--config.objective.teacher_workdir={workdir}", "--config.train.steps=2",
             "--config.sample.every_steps=0", "--config.ckpt.async_save=False"]
  done = subprocess.run(student, cwd=ROOT, env=environment, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"teacher ema/0.995 from {workdir} (step {last})" in done.stderr, done.stderr[-3000:]
  assert (tmp_path / "student" / "checkpoints" / "2").is_dir()


class _MemoryPath:
  """An object store in a dict, behind the part of etils.epath that flowjax.storage uses."""

  def __init__(self, store, path):
    self.store, self.path = store, str(path)

  def exists(self):
    return self.path in self.store["objects"] or any(
        key.startswith(self.path.rstrip("/") + "/") for key in self.store["objects"])

  def is_file(self):
    return self.path in self.store["objects"]

  def mkdir(self, parents=False, exist_ok=False):
    del parents, exist_ok

  def read_bytes(self):
    return self.store["objects"][self.path]

  def write_bytes(self, data):
    self.store["objects"][self.path] = bytes(data)
    self.store["writes"].append((self.path, len(data)))


def _event_records(data: bytes):
  """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, the
  payload, its CRC)."""
  import struct

  from tensorboardX.proto import event_pb2
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12:offset + 12 + length])
    yield event
    offset += 12 + length + 4


def test_on_object_storage_each_flush_uploads_only_what_was_logged_since_the_last(monkeypatch):
  """A long run flushes at every checkpoint: the TensorBoard events go up in segments, each
  object written once, so the bytes uploaded grow with what was logged, not with the number of
  checkpoints times the run's length; every scalar and image still reaches the bucket, and the
  local event files are gone after each flush."""
  import numpy as np

  from flowjax import metrics, storage
  store = {"objects": {}, "writes": []}
  monkeypatch.setattr(storage, "_epath", lambda path: _MemoryPath(store, path))
  writer = metrics.Writer("mem://bucket/run", enabled=True)
  local = writer._events
  picture = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  step = 0
  for _ in range(6):
    for _ in range(25):
      step += 1
      writer.scalars(step, {"loss": 1.0 / step, "error": float(step)})
    writer.image(step, "samples", picture)
    writer.flush()
    assert os.listdir(local) == []
  writer.close()
  assert not os.path.exists(local)
  with pytest.raises(ValueError, match="closed"):
    writer.scalars(step + 1, {"loss": 1.0})
  events = {key: data for key, data in store["objects"].items()
            if key.startswith("mem://bucket/run/tensorboard/")}
  written = [key for key, _ in store["writes"] if key in events]
  assert len(events) == 6 and sorted(written) == sorted(events), written
  scalars, images = {}, 0
  for data in events.values():
    for event in _event_records(data):
      for value in event.summary.value:
        if value.HasField("image"):
          images += 1
        else:
          scalars.setdefault(value.tag, set()).add(event.step)
  assert scalars == {"loss": set(range(1, 151)), "error": set(range(1, 151))}
  assert images == 6
  records = [json.loads(line) for line in
             store["objects"]["mem://bucket/run/metrics.jsonl"].decode().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 151))


def test_datasets_on_object_storage(emulator, tmp_path, imagenet_latents):  # noqa: F811
  """data.name=packed:gs://... and latents:gs://...: a packed image folder and a latent cache
  copied to the bucket train as they do from local disk (metadata through flowjax.storage, the
  shards through array_record's own GCS reader)."""
  from flowjax.data import prepare
  from test_packed_data import noise_folder
  _, environment = emulator
  prepare.prepare(noise_folder(str(tmp_path / "pets")), str(tmp_path / "packed"), image_size=8,
                  shard_size=5)
  upload(environment, tmp_path / "packed", f"gs://{BUCKET}/data/packed")
  upload(environment, imagenet_latents["out"], f"gs://{BUCKET}/data/latents")
  runs = {"packed": ["--config=experiments/quickstart.py:tiny",
                     f"--config.data.name=packed:gs://{BUCKET}/data/packed",
                     "--config.data.image_size=8"],
          "latents": ["--config=experiments/fm_imagenet.py:tiny",
                      f"--config.data.name=latents:gs://{BUCKET}/data/latents"]}
  for name, flags in runs.items():
    done = subprocess.run(
        [sys.executable, "-m", "flowjax.main", *flags, f"--workdir={tmp_path / name}",
         "--num_cpu_devices=1", "--config.train.steps=2", "--config.sample.every_steps=0",
         "--config.ckpt.async_save=False"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (name, done.stderr[-3000:])
    assert (tmp_path / name / "checkpoints" / "2").is_dir()
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["data"]["name"].startswith(f"{name}:gs://")
  # A dataset that is not in the bucket is the same clear error as on local disk.
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--config=experiments/quickstart.py:tiny",
       f"--config.data.name=packed:gs://{BUCKET}/data/nothing", "--config.data.image_size=8",
       f"--workdir={tmp_path / 'missing'}", "--num_cpu_devices=1", "--config.train.steps=2"],
      cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0, done.stderr[-3000:]
  assert f"there is no directory 'gs://{BUCKET}/data/nothing'" in done.stderr, done.stderr[-3000:]


def test_unreadable_shards_on_object_storage_name_the_fix(monkeypatch):
  """array_record reads gs:// itself (from 0.8.6): when it cannot, the error names the version,
  the extra to install and the local-copy alternative; local paths keep their own error."""
  import grain

  from flowjax.data import packed

  def refuse(paths):
    raise RuntimeError(f"open() failed: No such file or directory; opening {paths[0]}")

  monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", refuse)
  remote = packed._Source(("gs://bucket/data/train/images-00000-of-00001.array_record",),
                          (8, 8, 3), "uint8")
  with pytest.raises(OSError, match=r"0\.8\.6.*\.\[gcs\].*local disk"):
    len(remote)
  local = packed._Source(("/data/train/images-00000-of-00001.array_record",), (8, 8, 3), "uint8")
  with pytest.raises(RuntimeError, match="open"):
    len(local)


def test_fid_statistics_and_weights_on_object_storage(monkeypatch):
  """The FID assets a pod reads (converted Inception weights, reference statistics) may be
  objects: written as one upload, read back whole, and a missing one is the usual AssetError."""
  import numpy as np

  from flowjax import storage
  from flowjax.evals import fid
  store = {"objects": {}, "writes": []}
  monkeypatch.setattr(storage, "_epath", lambda path: _MemoryPath(store, path))
  arrays = {"mu": np.arange(4, dtype=np.float64), "sigma": np.eye(4)}
  fid.save_npz("mem://bucket/stats/cifar10.npz", arrays)
  assert [key for key, _ in store["writes"]] == ["mem://bucket/stats/cifar10.npz"]
  read = fid.read_npz("mem://bucket/stats/cifar10.npz", "FID reference statistics file", "fix")
  assert read.keys() == arrays.keys()
  for key in arrays:
    np.testing.assert_array_equal(read[key], arrays[key])
  with pytest.raises(fid.AssetError, match="mem://bucket/stats/none.npz does not exist"):
    fid.read_npz("mem://bucket/stats/none.npz", "FID reference statistics file", "fix")


def test_weights_in_safetensors_and_npz_on_object_storage(monkeypatch):
  """Converted networks' weights (an SD-VAE's safetensors, a HF index and its shards, an .npz)
  read from object storage as from disk; a torch pickle there names the fix."""
  import numpy as np
  from safetensors import numpy as safetensors_numpy

  from flowjax import state_dicts, storage
  store = {"objects": {}, "writes": []}
  monkeypatch.setattr(storage, "_epath", lambda path: _MemoryPath(store, path))
  first = {"encoder.weight": np.ones((2, 3), np.float32)}
  second = {"decoder.bias": np.arange(3, dtype=np.float32)}
  store["objects"]["mem://b/vae/one.safetensors"] = safetensors_numpy.save(first)
  store["objects"]["mem://b/vae/two.safetensors"] = safetensors_numpy.save(second)
  index = "mem://b/vae/diffusion_pytorch_model.safetensors.index.json"  # a prefixed index name
  store["objects"][index] = json.dumps({"weight_map": {
      "encoder.weight": "one.safetensors", "decoder.bias": "two.safetensors"}}).encode()
  merged = state_dicts.read_shards(index, "SD-VAE")
  assert sorted(merged) == ["decoder.bias", "encoder.weight"]
  np.testing.assert_array_equal(merged["decoder.bias"], second["decoder.bias"])
  import io
  buffer = io.BytesIO()
  np.savez(buffer, **first)
  store["objects"]["mem://b/net.npz"] = buffer.getvalue()
  np.testing.assert_array_equal(state_dicts.read_state_dict("mem://b/net.npz")["encoder.weight"],
                                first["encoder.weight"])
  store["objects"]["mem://b/net.pt"] = b"torch"
  with pytest.raises(state_dicts.ConversionError, match="read from local disk"):
    state_dicts.read_state_dict("mem://b/net.pt")


MODELS_SCRIPT = """
import dataclasses, json, os, sys
import jax
import numpy as np
from flowjax import storage, text
from flowjax.models import autoencoder
reference, bucket = sys.argv[1], sys.argv[2]
# A text encoder's width and fingerprint (what a run checks against cached caption features) are
# read in the bucket: no copy of the weights for them.
for name, encoder in (("t5_tiny", "t5"), ("gemma1_tiny", "gemma")):
  settings = text.TextSettings(encoder=encoder, path=f"{bucket}/{name}")
  local = dataclasses.replace(settings, path=os.path.join(reference, name))
  assert text.encoder_fingerprint(settings) == text.encoder_fingerprint(local)
  assert text.feature_dim(settings) == text.feature_dim(local) == 16
assert not os.path.exists(os.path.join(storage.cache_root(), "objects"))
for name, encoder, npz in (("t5_tiny", "t5", "t5_tiny_text.npz"),
                           ("gemma1_tiny", "gemma", "gemma1_tiny_text.npz")):
  want = np.load(os.path.join(reference, npz))
  settings = text.TextSettings(encoder=encoder, path=f"{bucket}/{name}",
                               max_length=want["input_ids"].shape[1])
  got = text.encoder_of(settings)
  captions = [str(c) for c in want["captions"]]
  np.testing.assert_array_equal(got.tokenize(captions)[0], want["input_ids"])
  np.testing.assert_allclose(got.encode(captions), want["features"], atol=2e-5, rtol=1e-4)
with open(os.path.join(reference, "sdvae_tiny.config.json")) as f:
  config = json.load(f)
model = autoencoder.from_diffusers_config(config)
shape = (config["sample_size"],) * 2 + (config["in_channels"],)
want = autoencoder.load_params(os.path.join(reference, "sdvae_tiny.safetensors"), model, shape)
for where in (f"{bucket}/vae", f"{bucket}/vae/diffusion_pytorch_model.safetensors"):
  got = autoencoder.load_params(where, model, shape)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
from flowjax.models import dinov2
want = dinov2.load(os.path.join(reference, "dinov2_tiny.safetensors"),
                   os.path.join(reference, "dinov2_tiny.json"))
got = dinov2.load(f"{bucket}/dinov2")
assert got[0] == want[0]
for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
  np.testing.assert_array_equal(a, b)
# A weights file alone: the config beside it comes with it.
from flowjax.models import t5
for (config, _, params), (config_want, _, params_want) in (
    (t5.load(f"{bucket}/t5_tiny/model.safetensors"), t5.load(os.path.join(reference, "t5_tiny"))),
    (dinov2.load(f"{bucket}/dinov2/model.safetensors"), want)):
  assert config == config_want
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_want)):
    np.testing.assert_array_equal(a, b)
# A folder that lacks a file: the error names the folder in the bucket, not its copy.
try:
  text.encoder_of(text.TextSettings(encoder="t5", path=f"{bucket}/t5_no_tokenizer"))
except FileNotFoundError as error:
  assert f"{bucket}/t5_no_tokenizer" in str(error) and storage.cache_root() not in str(error), error
else:
  raise AssertionError("no error")
copies = os.path.join(storage.cache_root(), "objects")
print(json.dumps(sorted(os.path.relpath(os.path.join(root, name), copies)
                        for root, _, names in os.walk(copies) for name in names)))
"""


def test_model_folders_on_object_storage(emulator, tmp_path):
  """Text encoders (a T5 folder; Gemma in text_encoder/ + tokenizer/), a DINOv2 folder (REPA's
  encoder) and an SD-VAE's weights in a bucket: read through one local copy per host (configs,
  tokenizers and safetensors only), with the features and parameters of the same files on disk;
  a new process reuses the copy, and a changed object is fetched again."""
  import shutil
  _, environment = emulator
  reference = os.path.join(ROOT, "tests", "reference")
  models = tmp_path / "models"
  for name in ("t5_tiny", "gemma1_tiny"):
    shutil.copytree(os.path.join(reference, name), models / name)
  (models / "t5_tiny" / "pytorch_model.bin").write_bytes(b"torch weights, not copied")
  shutil.copytree(models / "t5_tiny", models / "t5_no_tokenizer")
  os.remove(models / "t5_no_tokenizer" / "tokenizer.json")
  # A Lumina-style pipeline folder: only text_encoder/ and tokenizer/ are the encoder's.
  (models / "gemma1_tiny" / "transformer").mkdir()
  (models / "gemma1_tiny" / "transformer" / "model.safetensors").write_bytes(b"not copied")
  (models / "dinov2").mkdir()
  shutil.copyfile(os.path.join(reference, "dinov2_tiny.safetensors"),
                  models / "dinov2" / "model.safetensors")
  shutil.copyfile(os.path.join(reference, "dinov2_tiny.json"), models / "dinov2" / "config.json")
  (models / "vae").mkdir()
  shutil.copyfile(os.path.join(reference, "sdvae_tiny.safetensors"),
                  models / "vae" / "diffusion_pytorch_model.safetensors")
  (models / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not copied")
  bucket = f"gs://{BUCKET}/models"
  upload(environment, models, bucket)
  environment = dict(environment, XDG_CACHE_HOME=str(tmp_path / "cache"))
  script = [sys.executable, "-c", MODELS_SCRIPT, reference, bucket]
  done = subprocess.run(script, cwd=ROOT, env=environment, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  copied = json.loads(done.stdout.strip().splitlines()[-1])
  names = sorted(name.split("/data/", 1)[-1] for name in copied if "/data/" in name)
  # Configs, tokenizers and safetensors, in their sub-folders; no torch .bin, and of the
  # Lumina-style folder only the encoder's two sub-folders.
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "text_encoder/config.json", "text_encoder/model.safetensors",
          "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
          "diffusion_pytorch_model.safetensors"} == set(names), copied
  # Another process: the copies are reused as they are; a changed object is fetched again.
  reuse = """
import os, sys
from flowjax import storage
path = storage.local_copy(sys.argv[1])
print(os.stat(os.path.join(path, 'config.json')).st_mtime_ns, path)
"""
  started = time.time_ns()
  first = subprocess.run([sys.executable, "-c", reuse, f"{bucket}/t5_tiny"], env=environment,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  mtime, path = first.stdout.split()
  assert int(mtime) < started  # the first process's copy
  config = json.loads((models / "t5_tiny" / "config.json").read_text())
  config["note"] = "changed"
  (tmp_path / "config.json").write_text(json.dumps(config))
  upload(environment, tmp_path / "config.json", f"{bucket}/t5_tiny/config.json")
  second = subprocess.run([sys.executable, "-c", reuse, f"{bucket}/t5_tiny"], env=environment,
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.split()[1] == path
  assert json.loads(open(os.path.join(path, "config.json")).read())["note"] == "changed"
  # Rewritten with the same size (a fine-tuned network of one architecture): fetched again too.
  config["note"] = "CHANGED"
  (tmp_path / "config.json").write_text(json.dumps(config))
  time.sleep(1.1)  # object times are in seconds
  upload(environment, tmp_path / "config.json", f"{bucket}/t5_tiny/config.json")
  third = subprocess.run([sys.executable, "-c", reuse, f"{bucket}/t5_tiny"], env=environment,
                         capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-3000:]
  assert json.loads(open(os.path.join(path, "config.json")).read())["note"] == "CHANGED"
  # Processes of one host that ask for the same folder at once: one copies it, the others wait
  # for that copy (a file lock) and use it.
  together = """
import sys, time
from absl import logging
from flowjax import storage
logging.set_verbosity(logging.INFO)
while time.time() < float(sys.argv[2]):
  time.sleep(0.005)
print(storage.local_copy(sys.argv[1]))
"""
  environment = dict(environment, XDG_CACHE_HOME=str(tmp_path / "cache_together"))
  start = f"{time.time() + 8:.3f}"
  runs = [subprocess.Popen([sys.executable, "-c", together, f"{bucket}/gemma1_tiny", start],
                           env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(3)]
  outputs = [run.communicate(timeout=300) for run in runs]
  assert all(run.returncode == 0 for run in runs), outputs
  assert len({out.strip() for out, _ in outputs}) == 1, outputs
  assert sum(err.count("Copying gs://") for _, err in outputs) == 1, outputs


def test_dataset_writers_refuse_a_bucket_output_and_name_the_copy(tmp_path, monkeypatch):
  """prepare and cache_latents write shards to local disk: --out=gs://... is one error naming the
  local-then-copy route (and the data.name that reads the copy), not a local folder named 'gs:'."""
  from flowjax import config as config_lib
  from flowjax.data import cache_latents, prepare
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"writes to local disk.*data.name=packed:gs://b/packed"):
    prepare.prepare("folder:/nonexistent", "gs://b/packed", image_size=8)
  # A folder of images in a bucket: pack a local copy (the message names the route).
  with pytest.raises(ValueError, match=r"image folders are read from local disk.*packed:gs://"):
    prepare.prepare("folder:gs://b/pets", str(tmp_path / "packed"), image_size=8)
  config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "autoencoder_digits.py"),
                                      "tiny")
  with pytest.raises(ValueError, match=r"writes to local disk.*data.name=latents:gs://b/lat"):
    cache_latents.cache(config, "gs://b/lat", weights=str(tmp_path / "none"))
  assert not any(name.startswith("gs:") for name in os.listdir(tmp_path))


ARRAYS_SCRIPT = """
import sys
import ml_collections
import numpy as np
from flowjax.data import arrays, folder
local, bucket = sys.argv[1], sys.argv[2]
for name in ("digits.npz", "idx"):
  got = arrays.load(f"arrays:{bucket}/{name}", "train")
  want = arrays.load(f"arrays:{local}/{name}", "train")
  np.testing.assert_array_equal(got.images, want.images)
  np.testing.assert_array_equal(got.labels, want.labels)
assert arrays.splits(__import__("ml_collections").ConfigDict({"name": f"arrays:{bucket}/idx"})) \\
    == ("train",)
try:  # an error about the arrays names them in the bucket, not their local copy
  arrays.load(f"arrays:{bucket}/idx", "test")
except FileNotFoundError as error:
  assert f"{bucket}/idx" in str(error) and "flowjax/objects" not in str(error), error
else:
  raise AssertionError("split 'test' of a folder without t10k files was read")
try:
  folder._split_folder(f"folder:{bucket}/pets", "train")
except ValueError as error:
  assert "packed:gs://" in str(error), error
else:
  raise AssertionError("a folder on object storage was not refused")
print("ok")
"""


def test_own_arrays_on_object_storage(emulator, tmp_path):
  """data.name=arrays:gs://... (an .npz, or a folder of MNIST idx files) reads the same arrays as
  from disk, through a local copy; folder:gs://... is refused with the packing route named."""
  import gzip

  import numpy as np
  _, environment = emulator
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 8, 8), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.uint8)
  local = tmp_path / "data"
  (local / "idx").mkdir(parents=True)
  np.savez(local / "digits.npz", x_train=images, y_train=labels)
  with gzip.open(local / "idx" / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 3]) + np.asarray((16, 8, 8), ">u4").tobytes() + images.tobytes())
  with gzip.open(local / "idx" / "train-labels-idx1-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + np.asarray((16,), ">u4").tobytes() + labels.tobytes())
  bucket = f"gs://{BUCKET}/own"
  upload(environment, local, bucket)
  done = subprocess.run([sys.executable, "-c", ARRAYS_SCRIPT, str(local), bucket], cwd=ROOT,
                        env=dict(environment, XDG_CACHE_HOME=str(tmp_path / "cache")),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _prepare_tfds(data_dir):
  """A tiny TFDS image dataset 'flowjax_tiny' (8x8x3 PNGs, 3 classes, 12 train examples) built
  into `data_dir` in array_record, as `tfds build` writes one (PNGs encoded with PIL: no
  TensorFlow)."""
  import io

  import numpy as np
  import tensorflow_datasets as tfds
  from PIL import Image

  class FlowjaxTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(12):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
        png.seek(0)
        yield i, {"image": png, "label": i % 3}

  FlowjaxTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_data_dir_on_object_storage(emulator, tmp_path):
  """data.tfds_data_dir=gs://...: a TFDS dataset prepared in array_record and copied to the bucket
  trains as from disk (tfds reads its metadata through etils.epath, array_record the shards)."""
  _, environment = emulator
  _prepare_tfds(tmp_path / "tfds")
  upload(environment, tmp_path / "tfds" / "flowjax_tiny", f"gs://{BUCKET}/tfds/flowjax_tiny")
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--config=experiments/quickstart.py:tiny",
       "--config.data.name=tfds:flowjax_tiny", f"--config.data.tfds_data_dir=gs://{BUCKET}/tfds",
       "--config.data.image_size=8", f"--workdir={tmp_path / 'run'}", "--num_cpu_devices=1",
       "--config.train.steps=2", "--config.sample.every_steps=0",
       "--config.ckpt.async_save=False"],
      cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  # A dataset not prepared there: the usual error, naming the bucket directory.
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--config=experiments/quickstart.py:tiny",
       "--config.data.name=tfds:cifar10", f"--config.data.tfds_data_dir=gs://{BUCKET}/empty",
       f"--workdir={tmp_path / 'missing'}", "--num_cpu_devices=1", "--config.train.steps=2"],
      cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0
  assert f"is not prepared in gs://{BUCKET}/empty" in done.stderr, done.stderr[-3000:]


def test_a_cache_that_cannot_be_written_names_xdg_cache_home(monkeypatch, tmp_path):
  """A model on object storage whose local copy cannot be made (the cache directory is not a
  writable directory) is one OSError naming XDG_CACHE_HOME."""
  from flowjax import storage
  store = {"objects": {"mem://b/vae.safetensors": b"weights"}, "writes": []}

  class Stat:
    length, mtime = 7, 1

  monkeypatch.setattr(_MemoryPath, "stat", lambda self: Stat(), raising=False)
  monkeypatch.setattr(storage, "_epath", lambda path: _MemoryPath(store, path))
  (tmp_path / "not_a_directory").write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_directory"))
  with pytest.raises(OSError, match="set XDG_CACHE_HOME to a writable local directory"):
    storage.local_copy("mem://b/vae.safetensors")
