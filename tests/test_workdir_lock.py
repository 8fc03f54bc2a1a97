"""One run per workdir: the lock refuses a second holder, survives no dead one, and lets the
processes of one multi-process run each hold their own file."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from agriclip_jax import workdir_lock
from conftest import REPO

# A process that holds the lock of argv[1] (as process argv[3] of argv[4], coordinated at
# argv[2], when argv[4] > 1), says so on stdout, then waits to be killed.
_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[5])
    import jax
    from agriclip_jax import distributed, workdir_lock
    if int(sys.argv[4]) > 1:
      distributed.initialize(sys.argv[2], int(sys.argv[4]), int(sys.argv[3]))
    try:
      with workdir_lock.hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    except workdir_lock.WorkdirInUseError as e:
      print("refused:", e, flush=True)
""")


def _holder(workdir, process_id=0, num_processes=1, port=0):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(workdir), f"127.0.0.1:{port}", str(process_id),
       str(num_processes), str(REPO)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True)


def _said(process) -> str:
  """The holder's first line about the lock (gloo prints its own lines too)."""
  for line in process.stdout:
    if line.startswith(("held", "refused:")):
      return line.strip()
  return ""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_second_holder_is_refused_naming_the_first_and_a_dead_holder_leaves_no_lock(tmp_path):
  holder = _holder(tmp_path)
  try:
    assert _said(holder) == "held"
    with pytest.raises(workdir_lock.WorkdirInUseError) as error:
      with workdir_lock.hold(str(tmp_path)):
        pass
    message = str(error.value)
    assert f"pid {holder.pid} on {socket.gethostname()}, started " in message
    assert "\n" not in message
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(str(tmp_path)):  # The dead holder's flock went with it.
    with open(os.path.join(tmp_path, ".lock")) as f:
      assert json.load(f)["pid"] == os.getpid()


def test_processes_of_one_run_share_a_workdir_and_a_busy_one_stops_them_all(tmp_path):
  port = _free_port()
  run = [_holder(tmp_path, i, 2, port) for i in range(2)]
  try:
    assert [_said(p) for p in run] == ["held", "held"]
    assert os.path.exists(os.path.join(tmp_path, ".lock.1"))
  finally:
    for p in run:
      p.send_signal(signal.SIGKILL)
      p.wait()
  with workdir_lock.hold(str(tmp_path)):  # A single-process run holds process 0's lock...
    port = _free_port()
    run = [_holder(tmp_path, i, 2, port) for i in range(2)]
    outputs = [_said(p) for p in run]
    for p in run:
      p.wait(timeout=120)
  # ...so both processes of a second run stop, not only process 0.
  assert outputs[0].startswith("refused:") and f"pid {os.getpid()}" in outputs[0], outputs
  assert outputs[1].startswith("refused:") and "another process of this run" in outputs[1]


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory this process cannot write in: a read-only tmpfs as root (root writes through
  permission bits), else a directory without write permission."""
  path = tmp_path / "read_only"
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield str(path)
    path.chmod(0o755)
    return
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                    capture_output=True, check=False).returncode:
    pytest.skip("running as root, which writes through permission bits, and cannot mount a "
                "read-only tmpfs here")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_an_unusable_workdir_is_one_line_naming_path_and_cause(tmp_path, read_only_dir):
  a_file = tmp_path / "results"
  a_file.write_text("")
  cases = [
      (str(a_file), f"workdir {a_file} is a file, not a directory"),
      (str(a_file / "run"), f"cannot create workdir {a_file}/run: {a_file} is a file, not a "
                            "directory"),
      (read_only_dir, f"cannot write to workdir {read_only_dir}: "),
      (os.path.join(read_only_dir, "run"), f"cannot write to workdir {read_only_dir}/run: "),
  ]
  for workdir, message in cases:
    with pytest.raises(workdir_lock.WorkdirError) as raised:
      workdir_lock.create(workdir)
    assert str(raised.value).startswith(message), str(raised.value)
  workdir_lock.create(str(tmp_path / "new" / "run"))  # A usable one is made, probe gone.
  assert os.listdir(tmp_path / "new" / "run") == []
