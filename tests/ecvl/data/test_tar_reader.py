"""The fast tar reader yields exactly what webdataset's reader yields, and refuses broken tars."""

import io
import tarfile

import pytest
import webdataset as wds

from ecvl.data.tar_reader import iter_tar_samples, pax_path
from ecvl.errors import DataError


def _tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _plain(urls):
    return list(wds.tarfile_to_samples()(iter([{"url": u} for u in urls])))


LONG = "d/" + "k" * 150  # longer than a ustar name field: a PAX or GNU long-name header


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    members = [
        ("a.cls", b"1"),
        ("a.PNG", b"png bytes"),
        ("a.json", b"{}"),
        ("dir/b.c.cls", b"2"),  # suffix "c.cls", key "dir/b"
        ("noext", b"skipped"),
        ("__meta__", b"skipped too"),
        ("e.cls", b""),
        ("e.npy", b"x" * 1000),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG + ".cls", b"3"))
    urls = [_tar(tmp_path / "s0.tar", members, fmt), _tar(tmp_path / "s1.tar", members[:3], fmt)]
    ours = list(iter_tar_samples(urls))
    assert ours == _plain(urls)
    assert [s["__key__"] for s in ours][:3] == ["a", "dir/b", "e"]
    assert ours[0]["png"] == b"png bytes"  # suffixes lower-cased, as webdataset does


def test_directories_and_links_are_not_members(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tf:
        d = tarfile.TarInfo("d")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("d/x.cls")
        link.type = tarfile.SYMTYPE
        link.linkname = "y"
        tf.addfile(link)
        info = tarfile.TarInfo("d/z.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"5"))
    assert list(iter_tar_samples([str(path)])) == _plain([str(path)])
    assert [s["__key__"] for s in iter_tar_samples([str(path)])] == ["d/z"]


def test_duplicate_suffix_is_an_error(tmp_path):
    url = _tar(tmp_path / "s.tar", [("a.cls", b"1"), ("a.cls", b"2")])
    with pytest.raises(DataError, match=r"s.tar: sample 'a' has two 'cls' members"):
        list(iter_tar_samples([url]))


def test_truncated_tar_is_an_error_naming_the_shard(tmp_path):
    url = _tar(tmp_path / "s.tar", [("a.cls", b"1"), ("a.png", b"x" * 3000)])
    data = open(url, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:2000])  # inside the second member's data
    with pytest.raises(DataError, match=r"cut.tar: truncated tar \(member at byte 1024"):
        list(iter_tar_samples([str(cut)]))
    cut.write_bytes(data[:1100])  # inside the second header
    with pytest.raises(DataError, match=r"cut.tar: truncated tar \(a partial header"):
        list(iter_tar_samples([str(cut)]))


def test_corrupt_header_is_an_error(tmp_path):
    url = _tar(tmp_path / "s.tar", [("a.cls", b"1")])
    data = bytearray(open(url, "rb").read())
    data[257:262] = b"xxxxx"  # not a ustar header any more
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad.tar: corrupt tar header at byte 0 \(no ustar magic"):
        list(iter_tar_samples([str(bad)]))


def test_missing_shard_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot open shard \S+nope.tar"):
        list(iter_tar_samples([str(tmp_path / "nope.tar")]))


@pytest.mark.parametrize(
    "data, path",
    [
        (b"12 path=abc\n", b"abc"),
        (b"15 mtime=1.000\n12 path=abc\n", b"abc"),
        (b"15 mtime=1.000\n", None),
    ],
)
def test_pax_path_reads_the_path_record(data, path):
    assert pax_path(data) == path


@pytest.mark.parametrize("data", [b"0 path=abc\n", b"1 path=abc\n", b"x path=abc\n", b"12"])
def test_pax_path_refuses_a_record_that_cannot_advance(data):
    with pytest.raises(ValueError):
        pax_path(data)


def test_a_zero_length_pax_record_is_a_corrupt_tar_not_a_hang(tmp_path):
    """A PAX record whose length field is 0 would never advance the parser."""
    path = tmp_path / "s.tar"
    _tar(path, [(LONG + ".cls", b"3")])
    raw = path.read_bytes()
    at = raw.index(b" path=")
    start = raw.rindex(b"\n", 0, at) + 1 if b"\n" in raw[:at] else at - 3
    digits = raw[start:at]
    assert digits.isdigit()
    path.write_bytes(raw[:start] + b"0" * len(digits) + raw[at:])
    with pytest.raises(DataError, match="corrupt PAX header"):
        list(iter_tar_samples([str(path)]))
