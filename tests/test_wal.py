"""The mutation log's file format: records come back as written, in order,
across segments; damage (a torn tail, a flipped byte) is detected, reported
and skipped; concurrent appends share fdatasyncs; covered segments go."""

import numpy as np
from concurrency import all_returned, concurrently

from gradserve.server.mutations import Mutation, train_step
from gradserve.server.wal import WriteAheadLog, remove_segments_before, scan, segment_numbers


def write(directory, payloads, **kwargs):
    wal = WriteAheadLog(directory, **kwargs)
    commits = [wal.append([p]) for p in payloads]
    commits[-1].wait()
    wal.close()
    return commits


def test_records_come_back_in_order_across_segments(tmp_path):
    payloads = [bytes([k]) * (100 + k) for k in range(50)]
    commits = write(tmp_path, payloads, segment_bytes=1000)
    assert len(segment_numbers(tmp_path)) > 5
    got = list(scan(tmp_path))
    assert [bytes(p) for _, p in got] == payloads
    assert [pos for pos, _ in got] == [c.position for c in commits]
    # scanning from a position skips what came before it
    assert [bytes(p) for _, p in scan(tmp_path, commits[30].position)] == payloads[30:]


def test_a_torn_tail_is_reported_and_the_records_before_it_kept(tmp_path):
    write(tmp_path, [b"a" * 300, b"b" * 300, b"c" * 300])
    path = tmp_path / "0000000000000001.wal"
    path.write_bytes(path.read_bytes()[:-100])  # the last record half written
    damage = []
    assert [bytes(p) for _, p in scan(tmp_path, 0, damage)] == [b"a" * 300, b"b" * 300]
    assert len(damage) == 1 and "runs past the end" in damage[0].reason and damage[0].nbytes == 208


def test_a_flipped_byte_drops_only_its_record(tmp_path):
    write(tmp_path, [b"a" * 300, b"b" * 300, b"c" * 300])
    path = tmp_path / "0000000000000001.wal"
    data = bytearray(path.read_bytes())
    data[16 + 308 + 8 + 150] ^= 0x01  # inside the second record's payload
    path.write_bytes(bytes(data))
    damage = []
    assert [bytes(p) for _, p in scan(tmp_path, 0, damage)] == [b"a" * 300, b"c" * 300]
    assert [d.reason for d in damage] == ["CRC mismatch"]


def test_a_new_log_starts_a_new_segment_and_leaves_the_old_tail_alone(tmp_path):
    write(tmp_path, [b"x" * 10])
    write(tmp_path, [b"y" * 10])
    assert segment_numbers(tmp_path) == [1, 2]
    assert [bytes(p) for _, p in scan(tmp_path)] == [b"x" * 10, b"y" * 10]


def test_concurrent_appends_share_fdatasyncs(tmp_path):
    wal = WriteAheadLog(tmp_path)

    def appender(k):
        for j in range(50):
            wal.append([f"{k}:{j};".encode() * 100]).wait()

    results = concurrently(8, appender)
    wal.close()
    all_returned(results)
    assert wal.stats.records == 400
    assert wal.stats.fsyncs < 400  # group commit: one fdatasync covered several appends
    per_thread = {}
    for _, p in scan(tmp_path):
        k, j = bytes(p).split(b";")[0].decode().split(":")
        per_thread.setdefault(k, []).append(int(j))
    assert per_thread == {str(k): list(range(50)) for k in range(8)}  # each appender's records in its order


def test_segments_before_a_position_are_removed_but_not_later_ones(tmp_path):
    commits = write(tmp_path, [b"z" * 400 for _ in range(10)], segment_bytes=1000)
    before = segment_numbers(tmp_path)
    removed = remove_segments_before(tmp_path, commits[5].position)
    assert removed > 0 and segment_numbers(tmp_path) == [n for n in before if n >= before[removed]]
    assert [bytes(p) for _, p in scan(tmp_path)][-5:] == [b"z" * 400] * 5


def test_a_train_step_record_round_trips_its_arrays_bit_for_bit():
    X = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 1])
    m = train_step(uid=7, version=3, step=2, X=X, y=y)
    back = Mutation.decode(b"".join(bytes(p) for p in m.encode()))
    assert (back.kind, back.uid, back.version, back.step) == (m.kind, 7, 3, 2)
    np.testing.assert_array_equal(back.arrays["inputs"], X)
    assert back.arrays["inputs"].dtype == X.dtype and back.arrays["targets"].dtype == y.dtype
    np.testing.assert_array_equal(back.arrays["targets"], y)
