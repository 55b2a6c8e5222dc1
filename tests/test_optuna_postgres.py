"""Two worker processes (each `compress_cli.run(recipe)`, what `compress run` calls) share one
Optuna study on a real PostgreSQL server (127.0.0.1) and together run exactly n_trials trials,
each by exactly one worker.

The server: $COMPRESS_TEST_PG_URL when set (CI starts it with scripts/start_postgres.sh), else
this fixture runs that script (without installing anything); the test is skipped, saying why,
when no server can be had.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg_url() -> str:
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[postgres]')")
    url = os.environ.get("COMPRESS_TEST_PG_URL")
    if not url:
        script = ROOT / "scripts" / "start_postgres.sh"
        try:
            p = subprocess.run(
                ["bash", str(script)],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "COMPRESS_PG_NO_INSTALL": "1"},
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot start PostgreSQL with {script.name}: {e}")
        if p.returncode != 0 or not p.stdout.strip():
            pytest.skip(
                f"cannot start PostgreSQL with {script.name} (exit {p.returncode}): {p.stderr.strip()[-300:]}"
            )
        url = p.stdout.strip().splitlines()[-1]
    import sqlalchemy

    from compress_cli.hpo.storage import with_driver

    try:
        with sqlalchemy.create_engine(with_driver(url)).connect() as c:
            c.execute(sqlalchemy.text("select 1"))
    except Exception as e:
        pytest.skip(f"PostgreSQL at {url} does not answer: {type(e).__name__}: {str(e).splitlines()[0]}")
    return url


def test_two_workers_share_one_study(tmp_path, pg_url, monkeypatch):
    import optuna

    import compress_cli
    from compress_cli.hpo.storage import with_driver

    study = f"test-{uuid.uuid4().hex[:10]}"
    n_trials = 6
    recipe = {
        "version": 1,
        "name": "shared",
        "seed": 0,
        "device": "cpu",
        "model": {"source": "zoo:digits_mlp"},
        "data": {"source": "digits"},
        "measure": {"latency": None, "macs": False},
        "stages": [
            {
                "type": "hpo",
                "n_trials": n_trials,
                "pruner": "none",
                "storage": pg_url,
                "study_name": study,
                # off here: two workers that start together may both enqueue the configured values
                "enqueue_defaults": False,
                "stages": [{"type": "finetune", "epochs": 2, "max_steps_per_epoch": 8}],
                "space": {
                    "finetune.lr": {"float": [1e-4, 0.3], "log": True},
                    "finetune.optimizer": {"categorical": ["sgd", "adam"]},
                },
            }
        ],
    }
    rpath = tmp_path / "shared.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    # two worker processes forked from one server that imported torch once (a worker is
    # `compress_cli.run(recipe)`, what `compress run` calls; two fresh interpreters would spend most
    # of this test importing torch twice on a 2-core machine)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "torch._dynamo", "optuna", "compress_cli.engine.run", "compress_cli.hpo.search"]
    )
    procs = [
        ctx.Process(target=compress_cli.run, args=(str(rpath),), kwargs={"output": str(tmp_path / f"w{i}")})
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]

    trials = optuna.load_study(study_name=study, storage=with_driver(pg_url)).get_trials()
    real = [t for t in trials if not t.user_attrs.get("overflow")]
    assert len(real) == n_trials
    assert sorted(t.number for t in real) == list(range(n_trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in real)
    assert len({t.user_attrs["worker"] for t in real}) in (1, 2)
    # each trial ran in exactly one worker: the workers' tables split the trials between them
    ran = []
    for i in range(2):
        rep = json.loads((tmp_path / f"w{i}" / "report.json").read_text())
        rows = rep["stages"][0]["details"]["trials"]
        assert len(rows) == n_trials
        ran.append({r["number"] for r in rows if r["ran_here"]})
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(range(n_trials))
    # no two trials drew the same parameters (the workers' samplers are seeded apart)
    assert len({tuple(sorted(t.params.items())) for t in real}) == n_trials
