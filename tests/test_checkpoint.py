import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from checkpoint_damage import HOW, damage

from jaxfit import optim, sharding, step
from jaxfit.checkpoint import Checkpointer, NoUsableCheckpointError, latest_step_in, to_abstract


def _state(seed=0):
    """A TrainState after one real update: non-trivial Adam moments, mixed dtypes."""
    rng = np.random.default_rng(seed)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        },
        "emb": jnp.asarray(rng.normal(size=(5, 2)), jnp.bfloat16),
        "logit_scale": jnp.float32(2.6592),
    }
    cfg = optim.default_optim_config()
    cfg.warmup_steps = 0
    tx, _ = optim.make_optimizer(cfg, 100, params)
    state = step.create_train_state(params, tx, jax.random.key(seed + 42))
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


META = {"data": {"epoch": 1, "position": 1234}, "config": {"lr": 1e-4, "name": "clip"}}


def _assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_round_trip_is_bit_exact(tmp_path):
    state = _state()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(1, state, META)
        ckpt.wait()
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(to_abstract(state))
    _assert_bit_exact(restored, state)
    assert isinstance(restored, step.TrainState)
    assert meta == META


def test_restore_into_abstract_state_with_shardings(tmp_path):
    """The trainer's path: shapes from eval_shape, shardings attached by to_abstract."""
    state = _state()
    mesh = sharding.make_mesh()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, {})
        ckpt.wait()
        abstract = to_abstract(jax.eval_shape(lambda: state), sharding.replicated(mesh))
        restored, meta = ckpt.restore(abstract, step=7)
    _assert_bit_exact(restored, state)
    assert meta == {}
    for x in jax.tree.leaves(restored):
        assert x.sharding == sharding.replicated(mesh)


def test_keeps_last_k_and_interval(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = {s: ckpt.save(s, state, {"step": s}) for s in range(1, 7)}
        # Orbax always takes the first save of a directory (InitialSavePolicy).
        assert saved == {1: True, 2: True, 3: False, 4: True, 5: False, 6: True}
        assert ckpt.save(7, state, {"step": 7}, force=True)
        assert not ckpt.save(7, state, {"step": 7}, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert ckpt.restore(to_abstract(state), step=6)[1] == {"step": 6}
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [6, 7]


def test_interrupted_save_is_ignored(tmp_path):
    """A save killed before orbax's final rename leaves only a tmp dir; it must not count."""
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {"step": 5})
    # What an interrupted save of step 9 looks like on disk: a full payload, never renamed.
    shutil.copytree(tmp_path / "5", tmp_path / "9.orbax-checkpoint-tmp-1700000000")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 5
        assert ckpt.all_steps() == [5]
        restored, meta = ckpt.restore(to_abstract(state))
        assert meta == {"step": 5}
        # A later save of the same step number still works.
        assert ckpt.save(9, state, {"step": 9})
        ckpt.wait()
        assert ckpt.latest_step() == 9
    _assert_bit_exact(restored, state)


def test_errors(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore({"a": jax.ShapeDtypeStruct((2,), jnp.float32)})
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, {"a": jnp.zeros(2)}, {"blob": b"bytes"})
        assert ckpt.latest_step() is None
        ckpt.save(1, {"a": jnp.zeros(2)}, {})
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match=r"step 3.*\[1\]"):
            ckpt.restore({"a": jax.ShapeDtypeStruct((2,), jnp.float32)}, step=3)


@pytest.mark.parametrize("how", HOW)
def test_damaged_latest_falls_back_to_previous(tmp_path, how):
    """A byte flip restores silently with orbax alone; the checksums written after each
    commit catch it, and every kind of damage is named with its step and file."""
    a, b = _state(0), _state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, a, {"step": 3})
        ckpt.save(6, b, {"step": 6})
    assert os.path.isfile(tmp_path / "6" / "jaxfit_checksums.json")
    name = damage(tmp_path / "6", how)
    with Checkpointer(tmp_path) as ckpt:
        problem = ckpt.verify(6)
        assert problem and ("_METADATA" if how == "metadata" else name) in problem
        assert ckpt.verify(3) is None
        restored, meta, step, problems = ckpt.restore_latest_usable(to_abstract(a))
        assert step == 3 and meta == {"step": 3} and list(problems) == [6]
        _assert_bit_exact(restored, a)
        # set aside: the step can be written again, and the evidence is kept
        moved = ckpt.set_aside(6, problems[6])
        assert ckpt.all_steps() == [3]
        assert os.path.isfile(os.path.join(moved, "reason.txt"))
        assert ckpt.save(6, b, {"step": 6})
        ckpt.wait()
        assert ckpt.verify(6) is None


def test_unsealed_checkpoint_is_checked_by_restoring(tmp_path):
    """Without checksums (killed between commit and seal), required files are checked and
    the restore itself is the test; no checkpoint usable -> one error listing each."""
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, {})
    os.remove(tmp_path / "2" / "jaxfit_checksums.json")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.verify(2) is None
        with pytest.raises(NoUsableCheckpointError, match="step 2: rejected"):
            ckpt.restore_latest_usable(to_abstract(state), check=lambda s: "rejected")
        for root, _, names in os.walk(tmp_path / "2" / "state"):
            for name in names:  # every data file cut short
                if os.sep + "d" in root:
                    os.truncate(os.path.join(root, name), 10)
        with pytest.raises(NoUsableCheckpointError, match=r"step 2: it does not restore"):
            ckpt.restore_latest_usable(to_abstract(state))


def test_confirmed_retention_keeps_the_last_good(tmp_path):
    """confirm_saves: a new checkpoint deletes nothing until confirmed; then the newest
    max_to_keep up to it are kept."""
    state = _state()
    with Checkpointer(tmp_path, max_to_keep=1, confirm_saves=True) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        assert ckpt.confirm(1) == []
        ckpt.save(2, state, {})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]  # 2 unconfirmed: 1 is still the good one
        assert ckpt.confirm(2) == [1]
        assert ckpt.all_steps() == [2]
        ckpt.save(3, state, {})
        ckpt.confirm(3)  # possibly still being written: retention catches up in wait()
        ckpt.wait()
        assert ckpt.all_steps() == [3]
    assert latest_step_in(tmp_path) == 3 and latest_step_in(tmp_path / "nope") is None


# --- readers: read-only, sealed first, retention mid-read; sealing on the next start --------


def _two_checkpoints(directory, seal_newest=True):
    """Steps 3 (state a) and 6 (state b), both sealed unless ``seal_newest`` is False."""
    a, b = _state(0), _state(1)
    with Checkpointer(directory) as ckpt:
        ckpt.save(3, a, {"step": 3})
        ckpt.save(6, b, {"step": 6})
    if not seal_newest:
        os.remove(directory / "6" / "jaxfit_checksums.json")
    return a, b


def test_read_only_writes_nothing(tmp_path):
    """A reader neither creates the directory nor cleans up a save in flight (orbax's
    temporary directory), and refuses to save, confirm or set aside."""
    state, _ = _two_checkpoints(tmp_path)
    in_flight = tmp_path / "9.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "6", in_flight)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        restored, meta, step, problems = ckpt.restore_latest_usable(to_abstract(state))
        assert (step, meta, problems) == (6, {"step": 6}, {})
        for call in (
            lambda: ckpt.save(7, state, {}),
            lambda: ckpt.confirm(6),
            lambda: ckpt.set_aside(6, "no"),
        ):
            with pytest.raises(PermissionError, match="read-only"):
                call()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert in_flight.is_dir()
    with Checkpointer(tmp_path / "absent", read_only=True) as ckpt:
        assert ckpt.all_steps() == []
    assert not (tmp_path / "absent").exists()


def test_read_only_sees_steps_added_and_removed(tmp_path):
    """The list is read from the disk at each call (a run adds and removes steps)."""
    state = _state()
    with Checkpointer(tmp_path) as writer, Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == []
        writer.save(1, state, {})
        writer.wait()
        assert reader.all_steps() == [1] and reader.latest_step() == 1
        writer.save(2, state, {"step": 2})
        writer.wait()
        writer._manager.delete(1)
        assert reader.all_steps() == [2]
        assert reader.restore(to_abstract(state))[1] == {"step": 2}  # saved after it opened


def test_reader_takes_the_newest_sealed_and_skips_unsealed(tmp_path, caplog):
    """Read-only, an unsealed newer checkpoint (a run still sealing it, or one stopped
    before) is skipped with a warning; only when none is sealed is it checked as
    training checks it (orbax's metadata and a restore), and never sealed by a reader."""
    a, b = _two_checkpoints(tmp_path, seal_newest=False)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        restored, meta, step, problems = ckpt.restore_latest_usable(to_abstract(a))
    assert (step, meta, problems) == (3, {"step": 3}, {})
    _assert_bit_exact(restored, a)
    assert "[6] in" in caplog.text and "not sealed yet" in caplog.text
    os.remove(tmp_path / "3" / "jaxfit_checksums.json")
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        restored, meta, step, _ = ckpt.restore_latest_usable(to_abstract(b))
        assert (step, meta) == (6, {"step": 6})
        _assert_bit_exact(restored, b)
        state, meta = ckpt.restore_checked(to_abstract(a), 3)
        _assert_bit_exact(state, a)
    assert not (tmp_path / "6" / "jaxfit_checksums.json").exists()  # a reader seals nothing


def test_training_seals_an_unsealed_checkpoint_that_verifies(tmp_path):
    """On the next start (a writable Checkpointer), an unsealed checkpoint that passes
    orbax's metadata check, the restore and the caller's check is sealed (and then
    verifies by checksum); one whose orbax metadata records no commit is damaged."""
    a, b = _two_checkpoints(tmp_path, seal_newest=False)
    with Checkpointer(tmp_path) as ckpt:
        assert not ckpt.is_sealed(6) and ckpt.orbax_problem(6) is None
        with pytest.raises(NoUsableCheckpointError, match="step 6: rejected"):
            ckpt.restore_latest_usable(to_abstract(b), check=lambda s: "rejected")
        assert not ckpt.is_sealed(6)  # rejected: not sealed
        _, _, step, _ = ckpt.restore_latest_usable(to_abstract(b))
        assert step == 6 and ckpt.is_sealed(6) and ckpt.verify(6) is None
    os.remove(tmp_path / "6" / "jaxfit_checksums.json")
    meta_file = tmp_path / "6" / "_CHECKPOINT_METADATA"
    meta_file.write_text(meta_file.read_text().replace('"commit_timestamp_nsecs"', '"x"'))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.orbax_problem(6) == "_CHECKPOINT_METADATA records no commit"
        restored, _, step, problems = ckpt.restore_latest_usable(to_abstract(a))
        assert step == 3 and problems == {6: "_CHECKPOINT_METADATA records no commit"}
        _assert_bit_exact(restored, a)
        assert not ckpt.is_sealed(6)
        with pytest.raises(NoUsableCheckpointError, match="step 6 .* unusable: .*no commit"):
            ckpt.restore_checked(to_abstract(b), 6)


def test_a_step_removed_while_read_is_not_damage(tmp_path):
    """Retention (one rename) removes the step a reader is restoring: the reader reads
    the list again and takes the next one, reporting no damage; with an explicit step
    it says the step was removed."""
    a, b = _two_checkpoints(tmp_path)
    elsewhere = tmp_path.parent / "moved"

    def remove_6_once(state):
        if (tmp_path / "6").is_dir():
            os.rename(tmp_path / "6", elsewhere)
        return None

    with Checkpointer(tmp_path, read_only=True) as ckpt:
        restored, meta, step, problems = ckpt.restore_latest_usable(
            to_abstract(a), check=remove_6_once
        )
        assert (step, meta, problems) == (3, {"step": 3}, {})
        _assert_bit_exact(restored, a)
        os.rename(elsewhere, tmp_path / "6")
        with pytest.raises(FileNotFoundError, match="step 6 .* removed .* while it was read"):
            ckpt.restore_checked(to_abstract(b), 6, check=remove_6_once)


def test_retention_keeps_the_last_sealed_and_deletes_by_rename(tmp_path, monkeypatch):
    """A newer checkpoint whose seal could not be written (a full disk) does not count
    among the kept ones: the sealed one before it stays. Deleted steps pass through
    ``jaxfit_deleting/`` (one rename, so a reader sees them whole or not at all), which
    is emptied."""
    state = _state()
    in_trash = []
    empty = Checkpointer._empty_trash

    def look_then_empty(self):
        trash = tmp_path / "jaxfit_deleting"
        in_trash.extend(sorted(os.listdir(trash)) if trash.is_dir() else [])
        empty(self)

    monkeypatch.setattr(Checkpointer, "_empty_trash", look_then_empty)
    with Checkpointer(tmp_path, max_to_keep=1, confirm_saves=True) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        ckpt.save(2, state, {})
        ckpt.wait()
        os.remove(tmp_path / "2" / "jaxfit_checksums.json")  # as if its seal failed
        assert ckpt.confirm(2) == []
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, state, {})
        ckpt.wait()
        assert ckpt.confirm(3) == [1, 2]
        assert ckpt.all_steps() == [3]
    assert in_trash == ["1", "2"]  # moved whole, then deleted
    assert not (tmp_path / "jaxfit_deleting").exists()  # emptied, then removed
