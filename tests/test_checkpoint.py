import pytest
import torch

from smalti import formats
from smalti.checkpoint import CheckpointStore, load_checkpoint
from smalti.errors import CheckpointError


def _payload(value: int) -> dict:
    return {"format": formats.CHECKPOINT, "weights": torch.full((4,), float(value)), "meta": {"step": value}}


def test_keep_last_k_and_latest_pointer(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    for batch in (10, 20, 30):
        store.save(_payload(batch), f"ep0-ba{batch}.pt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["ep0-ba20.pt", "ep0-ba20.pt.sha256", "ep0-ba30.pt", "ep0-ba30.pt.sha256", "latest"]
    assert store.latest().name == "ep0-ba30.pt"
    assert load_checkpoint(store.latest())["meta"] == {"step": 30}


def test_pruning_orders_by_batch_not_by_name(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save(_payload(9), "ep0-ba9.pt")
    store.save(_payload(10), "ep0-ba10.pt")
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ep0-ba10.pt"]


def test_flipped_byte_is_detected(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    path = store.save(_payload(1), "ep0-ba1.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint_without_sidecar(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    path = store.save(_payload(1), "ep0-ba1.pt")
    path.with_name(path.name + ".sha256").unlink()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_not_a_smalti_checkpoint_and_missing(tmp_path):
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Smalti checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": formats.CHECKPOINT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "evil.pt")


def test_partial_writes_are_removed_and_latest_survives(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_payload(1), "ep0-ba1.pt")
    (tmp_path / ".ep0-ba2.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert store.latest().name == "ep0-ba1.pt"
    assert [p.name for p in store.remove_partial_writes()] == [".ep0-ba2.pt.abc123.tmp"]
    (tmp_path / "latest").write_text("ep0-ba7.pt\n")
    with pytest.raises(CheckpointError, match="points at 'ep0-ba7.pt'"):
        store.latest()


def test_memory_url(tmp_path):
    import fsspec

    path = CheckpointStore(tmp_path, keep=1).save(_payload(5), "ep0-ba5.pt")
    with fsspec.open("memory://ckpt/ep0-ba5.pt", "wb") as handle:
        handle.write(path.read_bytes())
    assert load_checkpoint("memory://ckpt/ep0-ba5.pt")["meta"] == {"step": 5}


def test_http_url(tmp_path, http_server):
    CheckpointStore(tmp_path, keep=1).save(_payload(7), "ep0-ba7.pt")
    url = http_server(tmp_path)
    assert load_checkpoint(f"{url}/ep0-ba7.pt")["meta"] == {"step": 7}
    with pytest.raises(CheckpointError, match="not found|cannot read"):
        load_checkpoint(f"{url}/missing.pt")


def test_ctrl_c_during_a_save_finishes_the_checkpoint_then_interrupts(tmp_path, monkeypatch):
    """SIGINT inside torch.save used to break its zip writer (a RuntimeError traceback, CI run of stop 27)."""
    import os
    import signal

    from smalti import checkpoint

    original, sent = checkpoint._HashingWriter.write, []

    def write_then_signal(self, data):
        if not sent:  # the user presses Ctrl-C while the first bytes are written
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, data)

    monkeypatch.setattr(checkpoint._HashingWriter, "write", write_then_signal)
    store = CheckpointStore(tmp_path, keep=2)
    with pytest.raises(KeyboardInterrupt):
        store.save({"format": formats.CHECKPOINT, "weights": torch.arange(1000.0)}, "ep0-ba2.pt")
    assert sent and store.latest() == tmp_path / "ep0-ba2.pt"
    assert torch.equal(load_checkpoint(store.latest())["weights"], torch.arange(1000.0))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_weights_digest_covers_every_tensor_including_scalar_buffers():
    """A 0-dim integer buffer (BatchNorm's num_batches_tracked, an algorithm's counter) broke the digest."""
    from smalti.checkpoint import weights_sha256

    state = {"w": torch.ones(2, 3), "count": torch.tensor(7), "flag": torch.tensor([True, False])}
    digest = weights_sha256(state)
    assert digest == weights_sha256({name: state[name].clone() for name in reversed(list(state))})  # name order
    assert digest != weights_sha256({**state, "count": torch.tensor(8)})
    assert digest != weights_sha256({**state, "w": torch.ones(3, 2)})  # the same bytes in another shape


def test_a_sharded_checkpoint_replaces_one_of_the_same_name(tmp_path):
    # A run that fell back past a damaged sharded checkpoint trains to the same batch again and commits a
    # folder of the same name: the new one replaces it, as a single file's rename does.
    store = CheckpointStore(tmp_path, keep=2)
    for content in (b"old", b"new"):
        temporary = tmp_path / ".ep0-ba4.dcp.tmp"
        temporary.mkdir()
        (temporary / "shard").write_bytes(content)
        (temporary / "SHA256SUMS").write_text("")
        store.commit(temporary, "ep0-ba4.dcp")
    assert (tmp_path / "ep0-ba4.dcp" / "shard").read_bytes() == b"new"
    assert store.latest().name == "ep0-ba4.dcp" and not temporary.exists()


# ------------------------------------------------------------ the plain fields, without torch (issue 35)


def _training_checkpoint(tmp_path):
    from smalti.checkpoint import load_payload
    from smalti.payload import Payload

    fields = dict(recipe={"seed": 1}, recipe_fingerprint="f" * 64, timestamp={"batch": 3}, scheduler={}, scaler=None,
                  rng=[torch.get_rng_state(), (3, (1, 2), None)], sampler={}, tokenizer=None, data={}, classes=["a"],
                  policy_fingerprint=None, eval_metrics={"loss": 2.5}, evaluated_at=3, algorithms={}, callbacks={},
                  ledger={"head": {"size": 4}}, train_loss=2.25, eval_by_class={"a": 2.0, "b": 3.5})
    payload = {**Payload(**fields).to_dict(), "model": {"w": torch.ones(3)}, "optimizer": {"state": {}}}
    path = CheckpointStore(tmp_path, keep=1).save(payload, "ep0-ba3.pt")
    return path, load_payload(path)


def test_the_report_reads_a_checkpoint_s_plain_fields_as_torch_does_without_running_its_code(tmp_path):
    from smalti.checkpoint_fields import Opaque, latest_checkpoint, read_fields

    path, loaded = _training_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) == path
    plain = read_fields(path)
    for name in ("recipe", "timestamp", "eval_metrics", "eval_by_class", "evaluated_at", "ledger", "train_loss",
                 "classes"):
        assert getattr(plain, name) == getattr(loaded, name), name
    assert isinstance(plain.model["w"], Opaque) and isinstance(plain.rng[0], Opaque)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": formats.CHECKPOINT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: .*refers to __builtin__.print") as info:
        read_fields(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        read_fields(path)
    (tmp_path / "latest").write_text("../../etc/passwd\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        latest_checkpoint(tmp_path)


def test_reading_a_checkpoint_s_fields_imports_no_torch(tmp_path):
    import subprocess
    import sys

    path, _ = _training_checkpoint(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import sys; from smalti.checkpoint_fields import read_fields; "
                           f"p = read_fields({str(path)!r}); print(p.eval_by_class, 'torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["{'a':", "2.0,", "'b':", "3.5}", "False"]
