"""The loop's finite check runs behind the device without blocking it, in step order."""

import types

import pytest

from agriclip_jax.trainers import loop as loop_lib


class _Value:
  """A metric the device may not have finished: is_ready() says, float() waits."""

  def __init__(self, value, ready):
    self.value, self.ready, self.waited = value, ready, False

  def is_ready(self):
    return self.ready

  def __float__(self):
    self.waited = not self.ready
    return float(self.value)


def _loop():
  fake = types.SimpleNamespace(workdir="/w")
  fake._check = lambda unchecked: loop_lib.Loop._check(fake, unchecked)
  return fake


def _step(step, loss=1.0, ready=False):
  return step, {"loss": _Value(loss, ready), "grad_norm": _Value(1.0, ready)}


def test_unfinished_steps_queue_up_to_the_limit_and_only_the_oldest_waits():
  fake, unchecked = _loop(), []
  for step in range(1, loop_lib.MAX_UNCHECKED + 1):
    unchecked.append(_step(step))
    unchecked = loop_lib.Loop._check_finished(fake, unchecked)
    assert len(unchecked) == step  # Nothing waited on: the device runs ahead.
  oldest = unchecked[0][1]["loss"]
  unchecked.append(_step(loop_lib.MAX_UNCHECKED + 1))
  unchecked = loop_lib.Loop._check_finished(fake, unchecked)
  assert len(unchecked) == loop_lib.MAX_UNCHECKED and oldest.waited
  assert not any(m["loss"].waited for _, m in unchecked)


def test_finished_steps_are_checked_at_once_in_order():
  fake = _loop()
  unchecked = [_step(1, ready=True), _step(2, ready=True), _step(3), _step(4, ready=True)]
  left = loop_lib.Loop._check_finished(fake, unchecked)
  assert [step for step, _ in left] == [3, 4]  # Step 4 waits its turn behind step 3.


def test_a_non_finite_step_is_named_even_when_found_later():
  fake = _loop()
  unchecked = [_step(7, loss=float("nan")), *(_step(s) for s in range(8, 13))]
  with pytest.raises(loop_lib.NonFiniteError, match="loss is nan at step 7"):
    loop_lib.Loop._check_finished(fake, unchecked)
