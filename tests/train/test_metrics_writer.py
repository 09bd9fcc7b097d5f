"""The run's numbers reach metrics.jsonl and TensorBoard event files (read back here with the
event protobuf and the TFRecord framing TensorBoard reads)."""

import math
import struct

from tensorboardX.proto import event_pb2

from pixelllm.train.metrics_writer import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, read_metrics


def _events(folder):
    scalars = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[(event.step, value.tag)] = value.simple_value
    return scalars


def test_scalars_go_to_the_jsonl_file_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, total_steps=4, initial_step=0, enabled=True) as writer:
        writer.advance(2)
        writer.write(2, {"loss/total": 1.5, "learning_rate": 5e-5, "grad_norm": math.nan})
        writer.write(4, {"loss/total": 0.25})
    assert read_metrics(tmp_path) == {2: {"loss/total": 1.5, "learning_rate": 5e-5,
                                          "grad_norm": None},
                                      4: {"loss/total": 0.25}}
    events = _events(tmp_path / TENSORBOARD_DIR)
    assert events[(2, "loss/total")] == 1.5 and events[(4, "loss/total")] == 0.25
    assert math.isclose(events[(2, "learning_rate")], 5e-5, rel_tol=1e-6)
    assert (2, "grad_norm") not in events  # non-finite values are left out


def test_other_processes_write_nothing(tmp_path):
    with MetricsWriter(tmp_path, total_steps=4, initial_step=0, enabled=False) as writer:
        writer.write(1, {"loss/total": 1.0})
    assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / TENSORBOARD_DIR).exists()
