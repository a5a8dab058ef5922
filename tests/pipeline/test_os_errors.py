"""File-system errors a user can act on are one line saying what to do; any other is a bug."""

from __future__ import annotations

import errno

import pytest

from pipeline.cli import os_error_line


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OSError(errno.EROFS, "Read-only file system", "data/.shards.tmp-a1b2/train-000000.tar"),
            "read-only file system: data/shards/train-000000.tar; write elsewhere",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "models/.stage1.tmp-x"),
            "permission denied: models/stage1; fix the permissions or write elsewhere",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "no space left on the device: data/shards; free some space or write elsewhere",
        ),
        (  # safetensors (Rust's io::Error)
            Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
            "no space left on the device: data/shards;",
        ),
        (  # h5py
            OSError("Unable to create file (unable to open file: name = 'x.h5', errno = 13)"),
            "permission denied: data/shards;",
        ),
        (  # re-raised from a DataLoader worker, the errno only in the text
            OSError("Caught OSError in DataLoader worker.\n...\nOSError: [Errno 30] Read-only"),
            "read-only file system: data/shards;",
        ),
    ],
)
def test_file_system_errors_are_one_line(error, line):
    assert os_error_line(error, "data/shards").startswith(line)


def test_an_error_caused_by_an_os_error_is_found_through_its_cause():
    try:
        try:
            raise FileExistsError(errno.EEXIST, "File exists", "data")
        except OSError as inner:
            raise RuntimeError("mkdir failed") from inner
    except RuntimeError as outer:
        assert os_error_line(outer).startswith("a file is where a folder belongs: data;")


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file", "x"),  # a bug: a path we should have made
        ValueError("width 64 vs 128"),
        RuntimeError("unexpected pos 704 vs 598"),
    ],
)
def test_other_errors_are_bugs_and_keep_their_traceback(error):
    assert os_error_line(error, "data/shards") is None
