"""gradserve-loadtest against a real gradserve server (a subprocess on a
free loopback port with a temporary SQLite store), plus the runner's
bookkeeping on fake calls. Small counts: the whole file runs in well under
a minute on 2 cores."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gradserve.client import loadtest
from gradserve.client.loadtest_runner import CallKind, format_report, mix_pattern, result_to_dict, run_load
from gradserve.v1 import trainer_pb2 as pb
from service_fixtures import ServerProcess, source_env

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "8,16,3", "--batch-size", "4"]
PERCENTILE_KEYS = ["p10", "p25", "p50", "p75", "p90", "p95", "p99"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("loadtest") / "store.db", "--durability", "interval")
    try:
        yield proc.target
    finally:
        proc.stop()


def run_tool(capsys, *argv) -> str:
    assert loadtest.main(list(argv)) == 0
    return capsys.readouterr().out


def list_model_ids(target: str) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary("/gradserve.v1.Trainer/ListModels",
                              request_serializer=pb.ListModelsRequest.SerializeToString,
                              response_deserializer=pb.ListModelsResponse.FromString)
        return {m.model_id for m in call(pb.ListModelsRequest(), timeout=10).models}


# ---------------------------------------------------------------- against a server

def test_counts_add_up_and_percentiles_are_monotone(server, capsys):
    out = run_tool(capsys, "--target", server, "--call", "mixed", "--mix", "predict=3,train-step=1",
                   "--concurrency", "4", "--total", "60", "--warmup", "8", "--models", "2",
                   "--format", "json", *SMALL)
    d = json.loads(out)
    assert d["count"] == 60
    assert d["ok"] + d["errors"] == 60
    assert sum(d["status_codes"].values()) == 60
    assert sum(k["count"] for k in d["per_call"].values()) == 60
    assert d["per_call"]["predict"]["count"] == 45  # 3:1 mix, spread evenly
    assert d["status_codes"] == {"OK": 60}
    lat = d["latency_ms"]
    values = [lat["fastest"]] + [lat[k] for k in PERCENTILE_KEYS] + [lat["slowest"]]
    assert values == sorted(values)
    assert lat["fastest"] <= lat["average"] <= lat["slowest"]
    assert sum(b["count"] for b in d["histogram"]) == d["ok"]


def test_json_report_matches_the_text_report(server, capsys, tmp_path):
    path = tmp_path / "report.json"
    run_tool(capsys, "--target", server, "--call", "predict", "--concurrency", "2", "--total", "30",
             "--format", "json", "--output", str(path), *SMALL)
    d = json.loads(path.read_text())
    text = format_report(d)
    assert re.search(rf"Count:\s+{d['count']}\n", text)
    assert f"Requests/sec: {d['rps']:.2f}" in text
    for p in ("50", "99"):
        assert f"{p} % in {d['latency_ms']['p' + p]:.3f} ms" in text
    assert f"[OK]   {d['status_codes']['OK']} responses" in text
    # and the text mode prints the same layout
    out = run_tool(capsys, "--target", server, "--call", "train-step", "--total", "5", *SMALL)
    assert "Latency distribution" in out and "Status code distribution" in out
    assert re.search(r"Count:\s+5\n", out)


def test_refused_calls_are_counted_by_status_code_and_message(server, capsys):
    out = run_tool(capsys, "--target", server, "--model-id", "does-not-exist", "--call", "predict",
                   "--concurrency", "2", "--total", "12", "--format", "json", *SMALL)
    d = json.loads(out)
    assert d["count"] == 12 and d["ok"] == 0 and d["errors"] == 12
    assert d["status_codes"] == {"NOT_FOUND": 12}
    assert len(d["error_messages"]) == 1
    assert d["error_messages"][0]["count"] == 12
    assert "does-not-exist" in d["error_messages"][0]["message"]
    assert d["latency_ms"] is None
    assert "does-not-exist" not in list_model_ids(server)  # nothing created on the way


def test_created_models_are_deleted_afterwards(server, capsys):
    before = list_model_ids(server)
    out = run_tool(capsys, "--target", server, "--call", "gradients", "--models", "3",
                   "--concurrency", "3", "--total", "9", "--format", "json", *SMALL)
    d = json.loads(out)
    assert d["models_created"] and len(d["model_ids"]) == 3
    assert d["status_codes"] == {"OK": 9}
    assert list_model_ids(server) == before


def test_given_models_are_kept(server, capsys):
    with grpc.insecure_channel(server) as ch:
        create = ch.unary_unary("/gradserve.v1.Trainer/CreateModel",
                                request_serializer=pb.CreateModelRequest.SerializeToString,
                                response_deserializer=pb.ModelInfo.FromString)
        req = pb.CreateModelRequest(model_id="kept-by-loadtest")
        req.spec.input_size = 8
        req.spec.hidden.add(units=16, activation="relu")
        req.spec.output.units = 3
        req.spec.output.kind = "softmax"
        create(req, timeout=30)
    out = run_tool(capsys, "--target", server, "--model-id", "kept-by-loadtest", "--call", "train-step",
                   "--total", "6", "--format", "json", "--engine", "aio", *SMALL)
    assert json.loads(out)["status_codes"] == {"OK": 6}
    assert "kept-by-loadtest" in list_model_ids(server)


def test_duration_and_open_loop_rate_are_respected(server, capsys):
    out = run_tool(capsys, "--target", server, "--call", "predict", "--duration", "1s", "--rps", "40",
                   "--concurrency", "4", "--warmup", "200ms", "--format", "json", *SMALL)
    d = json.loads(out)
    assert d["open_loop"] and d["rps_limit"] == 40
    assert 30 <= d["count"] <= 42
    assert d["total_s"] < 2.0


# ---------------------------------------------------------------- without a server

def test_importing_the_tool_does_not_import_numba():
    code = ("import sys, gradserve.client.loadtest; "
            "bad = [m for m in ('numba', 'nnkernels', 'server') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=source_env(), check=True, timeout=60)


def test_mix_pattern_spreads_calls_evenly():
    assert mix_pattern([8, 2]) == [0, 0, 1, 0, 0]
    assert sorted(mix_pattern([1, 1, 2])) == [0, 1, 2, 2]
    with pytest.raises(ValueError):
        mix_pattern([0, 0])


def test_runner_counts_client_side_failures_and_excludes_warmup():
    async def ok(i, n):
        await asyncio.sleep(0)

    async def broken(i, n):
        raise ValueError("bad payload")

    kinds = [CallKind("good", ok, 1), CallKind("bad", broken, 1)]
    result = asyncio.run(run_load(kinds, concurrency=3, total=40, warmup_calls=10, max_run_s=30))
    d = result_to_dict(result)
    assert d["count"] == 40 and d["warmup_calls"] == 10
    assert d["status_codes"] == {"CLIENT_ERROR": 20, "OK": 20}
    assert d["error_messages"] == [{"code": "CLIENT_ERROR", "message": "ValueError: bad payload", "count": 20}]


def test_flag_parsing():
    assert loadtest.parse_duration("500ms") == 0.5
    assert loadtest.parse_duration("2m") == 120
    assert loadtest.parse_warmup("100") == (100, 0.0)
    assert loadtest.parse_warmup("2s") == (0, 2.0)
    assert loadtest.parse_mix("predict=8,train-step=2") == {"predict": 8, "train-step": 2}
    with pytest.raises(Exception):
        loadtest.parse_mix("predikt=1")


def test_ctrl_c_ends_the_run_early_and_still_deletes_the_models(server, tmp_path):
    before = list_model_ids(server)
    report = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve.client.loadtest", "--target", server, "--call", "predict", "--models", "2",
         "--concurrency", "2", "--duration", "60s", "--format", "json", "--output", str(report), *SMALL],
        cwd=ROOT, env=source_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while list_model_ids(server) == before and time.monotonic() < deadline:
            time.sleep(0.2)  # the run is on once its models exist
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    d = json.loads(report.read_text())
    assert d["interrupted"] and d["count"] > 0 and d["total_s"] < 30
    assert list_model_ids(server) == before
