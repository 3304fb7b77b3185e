"""Issue 30, the invariant as a property: random trees of user files and earlier outputs of every kind, random
commands and flags (--overwrite, --colmap inside or beside the output), runs killed in their writer or by SIGKILL at
any point of their output work (then nothing of theirs may be left after the next run's tidy-up), things appearing
while a run writes and concurrent runs with nested outputs. After every step every file the package did not write is
byte-identical, every path a successful run printed exists, and no output was replaced by one of another kind
(`ownership_world.World.check`). Bounded: it runs in CI in well under a minute."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ownership_world import (
    CASES,
    CONVERT_INPUT,
    HARD_KILL_POINTS,
    PLACES,
    TARGETS,
    USER_TREES,
    Run,
    UserAdd,
    UserEdit,
    UserTree,
    play,
)

trees = st.sampled_from(sorted(USER_TREES))
targets = st.sampled_from(TARGETS)
kill_points = st.one_of(st.none(), st.integers(min_value=0, max_value=6))
hard_kill_points = st.one_of(st.none(), st.sampled_from(HARD_KILL_POINTS))


@st.composite
def runs(draw, nested: bool = True) -> Run:
    convert = CONVERT_INPUT.is_dir() and draw(st.integers(0, 5)) == 0  # the converter runs for real: fewer of them
    target = draw(targets)
    during = None
    if nested:
        during = draw(
            st.one_of(
                st.none(),
                st.builds(UserTree, trees, st.none()),
                st.builds(UserAdd, st.none()),
                runs(nested=False),
            )
        )
    hard_kill = draw(hard_kill_points) if during is None else None  # the forked run cannot report its `during`
    kill_at = draw(kill_points) if hard_kill is None else None
    if convert:
        command = draw(st.sampled_from(("convert", "convert-reconstruction-only")))
        return Run(command, target, draw(st.booleans()), None, kill_at, during, hard_kill)
    colmap = draw(st.one_of(st.none(), targets))
    return Run("reconstruct", target, draw(st.booleans()), colmap, kill_at, during, hard_kill)


steps = st.lists(
    st.one_of(
        runs(),
        st.builds(UserTree, trees, st.sampled_from(PLACES)),
        st.builds(UserAdd, st.sampled_from((*PLACES, "out/depth"))),
        st.builds(UserEdit, st.integers(0, 50)),
    ),
    min_size=1,
    max_size=6,
)


def with_the_issue_cases(test):
    """The six data-loss cases of the issue, and a SIGKILL at each point of a run that replaces an output and a
    COLMAP model beside it, are always tried first (hypothesis' explicit examples)."""
    for case in CASES.values():
        test = example(steps=case)(test)
    earlier = [Run("reconstruct", "out", colmap="sparse")]
    for point in HARD_KILL_POINTS:
        test = example(steps=[*earlier, Run("reconstruct", "out", True, colmap="sparse", hard_kill=point)])(test)
    return test


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
@with_the_issue_cases
def test_nothing_the_package_did_not_write_is_ever_lost(monkeypatch, capsys, steps):
    with tempfile.TemporaryDirectory() as root, monkeypatch.context() as patch:
        play(Path(root), steps, patch)
    capsys.readouterr()  # the refusals are expected; keep the report short
