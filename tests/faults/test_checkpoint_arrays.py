"""A deployed round aggregated from a single reply hands the server arrays that view gRPC's buffer
(memoryview); the checkpoint must still be written (it once failed the run: "cannot pickle memoryview")."""

import io

import torch
from flwr.app import ArrayRecord

from fedkd.checkpoint import _owned


def test_arrays_viewing_a_received_buffer_are_checkpointable():
    rec = ArrayRecord({"w": torch.arange(4.0)})
    rec["w"].data = memoryview(rec["w"].data)
    buf = io.BytesIO()
    torch.save(_owned(rec), buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert (back["w"].numpy() == torch.arange(4.0).numpy()).all()


def test_any_memoryview_in_a_checkpoint_is_saved_as_bytes():
    from fedkd.checkpoint import _dumps

    blob = _dumps({"recorder": [{"value": memoryview(b"abc")}]})
    assert torch.load(io.BytesIO(blob), weights_only=False)["recorder"][0]["value"] == b"abc"
