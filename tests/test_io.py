"""Atomic writes: unique temporary files beside the target, fsync, normal permissions, no leftovers."""

from __future__ import annotations

import os
import stat

import pytest

from medcert_core import io


def test_write_atomically_leaves_nothing_behind_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.csv"
    io.write_atomically(target, lambda path: path.write_text("old"))

    def fail(path):
        path.write_text("half")
        raise KeyboardInterrupt("crash")

    with pytest.raises(KeyboardInterrupt):
        io.write_atomically(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_temporary_names_are_unique_in_the_target_folder(tmp_path):
    seen = []
    for _ in range(3):
        io.write_atomically(tmp_path / "a.json", lambda path: seen.append(path) or path.write_text("{}"))
    assert len(set(seen)) == 3 and all(path.parent == tmp_path for path in seen)


def test_fsync_runs_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(io, "fsync_path", lambda path: events.append(("fsync", path.name)))
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("rename", os.path.basename(b))), real_replace(a, b)))
    io.write_atomically(tmp_path / "x.txt", lambda path: path.write_text("x"))
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]


def test_written_files_get_the_permissions_open_would_give(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_UMASK", 0o022)  # the process umask, read once at import
    path = io.write_atomically(tmp_path / "x.txt", lambda path: path.write_text("x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
