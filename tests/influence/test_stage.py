"""The runner's workspace: what a worker keeps from one stage to the next."""

from __future__ import annotations

from collections import Counter

from influence.stage import LocalExecutor, Pass, run_stage

LOADS: Counter = Counter()


def _load(kind: str):
    LOADS[kind] += 1
    return bytearray(1024)


def uses_model_and_basis(workspace, shared, payload):
    workspace.get(("model", "m"), lambda: _load("model"))
    workspace.get(("basis", "b"), lambda: _load("basis"))
    return sorted(key[0] for key in workspace._items)


def uses_model_and_sketcher(workspace, shared, payload):
    workspace.get(("model", "m"), lambda: _load("model"))
    workspace.get(("sketcher", "s"), lambda: _load("sketcher"))
    return sorted(key[0] for key in workspace._items)


def _run(name: str, work, executor) -> list:
    held = []
    run_stage(name, [Pass("only", [0, 1, 2], work, lambda task, result: held.append(result))], executor, progress=False)
    return held


def test_a_worker_keeps_its_model_across_stages_and_drops_what_a_stage_derived():
    LOADS.clear()
    executor = LocalExecutor()
    assert _run("fit", uses_model_and_basis, executor) == [["basis", "model"]] * 3
    # the index stage's tasks never see the fit's basis beside their sketcher; the model was loaded once
    assert _run("index", uses_model_and_sketcher, executor) == [["model", "sketcher"]] * 3
    assert LOADS == {"model": 1, "basis": 1, "sketcher": 1}
    # a second run of a stage starts from the model alone too: its basis is derived again
    assert _run("fit", uses_model_and_basis, executor) == [["basis", "model"]] * 3
    assert LOADS == {"model": 1, "basis": 2, "sketcher": 1}
    executor.release()
    assert _run("index", uses_model_and_sketcher, executor) == [["model", "sketcher"]] * 3
    assert LOADS == {"model": 2, "basis": 2, "sketcher": 2}
