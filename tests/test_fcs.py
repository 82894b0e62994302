"""read_fcs on synthetic files: every data type, byte order and known defect, against hand-built bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from hladr.cli.render import describe_sample
from hladr.errors import FCSDataError, FCSError, FCSKeywordError, FCSOffsetError, HladrError
from hladr.fcs import REPAIRS, Spillover, read_fcs, read_metadata, write_fcs


def build(keywords: dict[str, str], data: bytes, *, version="3.1", header_offsets=True, delim="/") -> bytes:
    """HEADER + TEXT + DATA assembled by hand (independent of hladr.write_fcs)."""
    kw = dict(keywords)
    begin = end = 0
    for _ in range(5):
        kw["$BEGINDATA"], kw["$ENDDATA"] = str(begin), str(end)
        text = (delim + "".join(f"{k}{delim}{v}{delim}" for k, v in kw.items())).encode("latin-1")
        new = (58 + len(text), 58 + len(text) + len(data) - 1)
        if new == (begin, end):
            break
        begin, end = new
    offsets = (58, 58 + len(text) - 1, begin if header_offsets else 0, end if header_offsets else 0, 0, 0)
    header = f"FCS{version}    ".encode() + "".join(f"{v:>8}" for v in offsets).encode()
    return header + text + data


def layout(n_par: int, n_tot: int, datatype: str, bits: list[int], byteord="1,2,3,4", **extra) -> dict:
    kw = {"$BYTEORD": byteord, "$DATATYPE": datatype, "$MODE": "L", "$NEXTDATA": "0"}
    kw.update({"$PAR": str(n_par), "$TOT": str(n_tot)})
    for i, b in enumerate(bits, start=1):
        kw.update({f"$P{i}N": f"ch{i}", f"$P{i}B": str(b), f"$P{i}E": "0,0", f"$P{i}R": str(2 ** min(b, 62))})
    kw.update(extra)
    return kw


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# --- data types -----------------------------------------------------------------------------------
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(
    "datatype,bits", [("F", None), ("D", None), ("I", 8), ("I", 16), ("I", 32), ("I", 64)]
)
def test_write_read_round_trip(tmp_path, rng, byteorder, datatype, bits):
    top = 2 ** (bits or 16) - 1 if datatype == "I" else 1e6
    events = rng.uniform(0, min(top, 2**40), size=(500, 5))
    if datatype == "I":
        events = np.rint(events)
        if bits == 64:
            events[0, 0] = 2**53  # largest integer float64 holds exactly
    path = write_fcs(
        tmp_path / "x.fcs",
        events,
        [f"c{i}" for i in range(5)],
        datatype=datatype,
        bits=bits,
        byteorder=byteorder,
    )
    sample = read_fcs(path)
    expected = events.astype(np.float32) if datatype == "F" else events
    np.testing.assert_array_equal(sample.events, expected)
    assert sample.events.dtype == (np.float32 if datatype == "F" else np.float64)
    assert sample.repairs == []
    assert sample.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_fcs32_mixed_datatypes_and_24bit_integers(tmp_path, rng):
    n = 300
    cols = {
        "i16": rng.integers(0, 2**16, n),
        "f32": rng.normal(size=n).astype(np.float32),
        "d64": rng.normal(size=n),
        "i24": rng.integers(0, 2**24, n),
        "i64": rng.integers(0, 2**52, n),
    }
    record = np.dtype([("i16", ">u2"), ("f32", ">f4"), ("d64", ">f8"), ("i24", "u1", 3), ("i64", ">u8")])
    packed = np.zeros(n, record)
    for name in ("i16", "f32", "d64", "i64"):
        packed[name] = cols[name]
    packed["i24"] = np.stack([(cols["i24"] >> s) & 0xFF for s in (16, 8, 0)], axis=1)  # big-endian bytes
    kw = layout(5, n, "I", [16, 32, 64, 24, 64], byteord="4,3,2,1")
    kw.update({"$P2DATATYPE": "F", "$P3DATATYPE": "D"})
    path = tmp_path / "mixed.fcs"
    path.write_bytes(build(kw, packed.tobytes(), version="3.2"))
    sample = read_fcs(path)
    assert sample.version == "3.2"
    for j, name in enumerate(cols):
        np.testing.assert_array_equal(sample.events[:, j], cols[name].astype(np.float64), err_msg=name)


def test_ascii_fixed_width_and_delimited(tmp_path):
    values = np.array([[1, 22, 333], [4444, 5, 66]])
    fixed = "".join(f"{v:>5}" for v in values.ravel()).encode()
    kw = layout(3, 2, "A", [5, 5, 5])
    (tmp_path / "fixed.fcs").write_bytes(build(kw, fixed))
    np.testing.assert_array_equal(read_fcs(tmp_path / "fixed.fcs").events, values)
    kw = layout(3, 2, "A", [8, 8, 8])
    kw.update({f"$P{i}B": "*" for i in (1, 2, 3)})
    (tmp_path / "free.fcs").write_bytes(build(kw, b"1,22,333\r\n4444,5,66"))
    np.testing.assert_array_equal(read_fcs(tmp_path / "free.fcs").events, values)


def test_offsets_only_in_text(tmp_path, rng):
    events = rng.integers(0, 1024, size=(200, 3))
    kw = layout(3, 200, "I", [16, 16, 16])
    path = tmp_path / "big.fcs"
    path.write_bytes(build(kw, events.astype("<u2").tobytes(), header_offsets=False))
    sample = read_fcs(path)  # zeros in the HEADER are compliant: no repair
    np.testing.assert_array_equal(sample.events, events)
    assert sample.repairs == []


def test_pnr_masks_flag_bits(tmp_path, rng):
    values = rng.integers(0, 1024, 100)
    stored = values | (rng.integers(0, 2, 100) << 14)  # a flag in bit 14
    kw = layout(1, 100, "I", [16], **{"$P1R": "1024"})
    path = tmp_path / "masked.fcs"
    path.write_bytes(build(kw, stored.astype("<u2").tobytes()))
    np.testing.assert_array_equal(read_fcs(path).events[:, 0], values)


def test_log_amplified_channels_decoded(tmp_path):
    stored = np.array([0, 256, 512, 1023])
    kw = layout(2, 4, "I", [16, 16], **{"$P1R": "1024", "$P2R": "1024", "$P1E": "4,1", "$P2E": "4,0"})
    data = np.column_stack([stored, stored]).astype("<u2").tobytes()
    path = tmp_path / "log.fcs"
    path.write_bytes(build(kw, data))
    with pytest.raises(FCSKeywordError, match="PnE_f2_zero"):
        read_fcs(path)
    sample = read_fcs(path, lenient=True)
    expected = 10 ** (4 * stored / 1024)  # f2 * 10 ** (f1 * x / R), f2 = 0 read as 1
    np.testing.assert_allclose(sample.events[:, 0], expected)
    np.testing.assert_allclose(sample.events[:, 1], expected)
    np.testing.assert_array_equal(sample.raw, np.column_stack([stored, stored]))
    assert sample.repairs == ["PnE_f2_zero"]


# --- defects: strict raises, lenient repairs and records ---------------------------------------------
def _patched(tmp_path, old: bytes, new: bytes, **kw) -> tuple:
    events = np.arange(60, dtype=float).reshape(20, 3)
    path = write_fcs(tmp_path / "ok.fcs", events, ["FSC-A", "SSC-A", "PE-A"], datatype="I", bits=16, **kw)
    blob = path.read_bytes()
    assert old in blob
    bad = tmp_path / "bad.fcs"
    bad.write_bytes(blob.replace(old, new, 1))
    return bad, events


@pytest.mark.parametrize(
    "old,new,error,repair",
    [
        (b"/$P2N/SSC-A/", b"/$P2N/FSC-A/", FCSKeywordError, "duplicate_channel_names"),
        (b"/$P3R/65536/", b"/$P3Q/65536/", FCSKeywordError, "missing_PnR"),
    ],
)
def test_defect_needs_named_repair(tmp_path, old, new, error, repair):
    bad, events = _patched(tmp_path, old, new)
    with pytest.raises(error, match=repair) as info:
        read_fcs(bad)
    assert str(bad) in str(info.value)
    sample = read_fcs(bad, lenient=True)
    assert repair in sample.repairs and repair in REPAIRS
    np.testing.assert_array_equal(sample.events, events)


def test_padded_keyword_needs_repair(tmp_path):
    events = np.arange(40).reshape(20, 2)
    kw = layout(2, 20, "I", [16, 16], **{"$P1N": "FSC-A ", " $P2N": "PE-A"})
    del kw["$P2N"]
    path = tmp_path / "pad.fcs"
    path.write_bytes(build(kw, events.astype("<u2").tobytes()))
    with pytest.raises(FCSKeywordError, match="keyword_whitespace"):
        read_fcs(path)
    sample = read_fcs(path, lenient=True)
    assert sample.channels == ["FSC-A", "PE-A"] and sample.repairs == ["keyword_whitespace"]
    np.testing.assert_array_equal(sample.events, events)


def test_text_must_end_with_its_delimiter(tmp_path):
    path = write_fcs(tmp_path / "ok.fcs", np.ones((10, 2)), ["a", "b"])
    blob = path.read_bytes()
    text_end = int(blob[18:26])
    short = blob[:18] + f"{text_end - 1:>8}".encode() + blob[26:]
    (tmp_path / "short.fcs").write_bytes(short)
    with pytest.raises(FCSOffsetError, match="text_end_off_by_one"):
        read_fcs(tmp_path / "short.fcs")
    assert read_fcs(tmp_path / "short.fcs", lenient=True).repairs == ["text_end_off_by_one"]


@pytest.mark.parametrize("in_header", [True, False])
def test_enddata_off_by_one(tmp_path, in_header):
    events = np.arange(60, dtype=float).reshape(20, 3)
    good = build(layout(3, 20, "I", [16, 16, 16]), events.astype("<u2").tobytes())
    end = int(good[34:42])
    assert len(str(end)) == len(str(end + 1))
    bad = good.replace(f"/$ENDDATA/{end}/".encode(), f"/$ENDDATA/{end + 1}/".encode())
    if in_header:  # both say one byte too many: off by one
        bad = bad[:34] + f"{end + 1:>8}".encode() + bad[42:]
        repairs = ["enddata_off_by_one"]
    else:  # HEADER is right, TEXT is one off: the pair fitting $TOT (the HEADER's) is used
        repairs = ["header_text_offset_mismatch"]
    path = tmp_path / "obo.fcs"
    path.write_bytes(bad + b"\0")
    with pytest.raises(FCSOffsetError, match=repairs[0]):
        read_fcs(path)
    sample = read_fcs(path, lenient=True)
    np.testing.assert_array_equal(sample.events, events)
    assert sample.repairs == repairs


def test_truncated_data_is_a_data_error(tmp_path):
    path = write_fcs(tmp_path / "ok.fcs", np.ones((100, 4)), list("abcd"), datatype="F")
    cut = tmp_path / "cut.fcs"
    cut.write_bytes(path.read_bytes()[:-40])
    for lenient in (False, True):
        with pytest.raises((FCSDataError, FCSOffsetError)) as info:
            read_fcs(cut, lenient=lenient)
        assert str(cut) in str(info.value)


def test_broken_delimiters_raise_text_error(tmp_path):
    path = write_fcs(tmp_path / "ok.fcs", np.ones((10, 2)), ["a", "b"])
    bad = tmp_path / "bad.fcs"
    bad.write_bytes(path.read_bytes().replace(b"/$PAR/2/", b"/$PAR/2|", 1))
    with pytest.raises(FCSError):
        read_fcs(bad, lenient=True)


def test_not_fcs_and_missing_file(tmp_path):
    junk = tmp_path / "junk.fcs"
    junk.write_bytes(b"hello world" * 20)
    with pytest.raises(FCSError, match="not an FCS file"):
        read_fcs(junk)
    with pytest.raises(FCSError, match="cannot open"):
        read_fcs(tmp_path / "absent.fcs")


# --- spillover, data sets, metadata, describe -----------------------------------------------------
def test_spillover_keywords_checked_against_channels(tmp_path):
    matrix = np.array([[1.0, 0.2], [0.05, 1.0]])
    events = np.ones((10, 3))
    for key in ("$SPILLOVER", "SPILL", "$SPILL"):
        text = "2,FITC-A,PE-A," + ",".join(f"{v:g}" for v in matrix.ravel())
        path = write_fcs(tmp_path / "s.fcs", events, ["FSC-A", "FITC-A", "PE-A"], keywords={key: text})
        sp = read_fcs(path).spillover
        assert sp.source == key and sp.channels == ("FITC-A", "PE-A")
        np.testing.assert_array_equal(sp.matrix, matrix)
    path = write_fcs(
        tmp_path / "w.fcs",
        events,
        ["FSC-A", "FITC-A", "PE-A"],
        spillover=Spillover(("FITC-A", "APC-A"), matrix),
    )
    with pytest.raises(FCSKeywordError, match="APC-A"):
        read_fcs(path)
    sample = read_fcs(path, lenient=True)
    assert sample.spillover is None and "spillover_dropped" in sample.repairs


def test_beckman_dfc_compensation(tmp_path):
    keywords = {"$DFC1TO2": "12.5", "$DFC2TO1": "3"}
    path = write_fcs(tmp_path / "b.fcs", np.ones((5, 2)), ["FL1", "FL2"], keywords=keywords)
    sp = read_fcs(path).spillover
    np.testing.assert_allclose(sp.matrix, [[1.0, 0.125], [0.03, 1.0]])


def test_several_data_sets(tmp_path, rng):
    first = rng.integers(0, 1024, size=(50, 2))
    second = rng.normal(size=(50, 3)).astype(np.float32)
    kw2 = layout(3, 50, "F", [32, 32, 32])
    part2 = build(kw2, second.tobytes(), version="3.0")
    kw1 = layout(2, 50, "I", [16, 16])
    for _ in range(3):  # $NEXTDATA = length of the first data set
        part1 = build({**kw1, "$NEXTDATA": kw1["$NEXTDATA"]}, first.astype("<u2").tobytes(), version="2.0")
        kw1["$NEXTDATA"] = str(len(part1))
    path = tmp_path / "two.fcs"
    path.write_bytes(part1 + part2)
    default = read_fcs(path)
    assert (default.dataset, default.n_datasets, default.version) == (1, 2, "3.0")
    np.testing.assert_array_equal(default.events, second)
    np.testing.assert_array_equal(read_fcs(path, dataset=0).events, first)
    with pytest.raises(FCSError, match="data set 5"):
        read_fcs(path, dataset=5)


def test_read_metadata_skips_data(tmp_path):
    path = write_fcs(
        tmp_path / "m.fcs",
        np.ones((1000, 2)),
        ["FSC-A", "PE-A"],
        ["", "HLA-DR"],
        keywords={"$CYT": "FACSCanto II", "$P2V": "450"},
    )
    meta = read_metadata(path)
    assert meta.events.shape == (0, 2) and meta.markers == ["", "HLA-DR"]
    assert meta.instrument["cytometer"] == "FACSCanto II" and meta.voltages["PE-A"] == 450
    assert meta.keywords["$TOT"] == "1000"


def test_describe_lists_channels_voltages_spillover_repairs(tmp_path):
    bad, _ = _patched(tmp_path, b"/$P2N/SSC-A/", b"/$P2N/FSC-A/", keywords={"$P3V": "512"})
    text = describe_sample(read_fcs(bad, lenient=True))
    assert "duplicate_channel_names" in text and "512 V" in text and "data set 1 of 1" in text


# --- mutations: a Sample or an HladrError, nothing else ----------------------------------------------
def _valid_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    events = rng.integers(0, 4000, size=(300, 4)).astype(float)
    folder = tmp_path_factory.mktemp("mut")
    return write_fcs(folder / "base.fcs", events, ["FSC-A", "SSC-A", "FITC-A", "PE-A"], datatype="I", bits=16)


def test_mutated_files_never_crash(tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    base = _valid_file(tmp_path_factory).read_bytes()
    out = tmp_path_factory.mktemp("mutants") / "m.fcs"
    text_end = int(base[18:26])

    def mutate(data, kind, pos, value, number):
        b = bytearray(data)
        if kind == "truncate":
            return bytes(b[: pos % len(b)])
        if kind == "flip":
            b[pos % len(b)] ^= value or 1
            return bytes(b)
        if kind == "header_offset":
            field = 10 + 8 * (pos % 4)
            b[field : field + 8] = f"{number % 100_000_000:>8}".encode()
            return bytes(b)
        if kind == "text_byte":  # break delimiters and numbers inside TEXT
            b[58 + pos % (text_end - 58)] = value
            return bytes(b)
        key = {"par": b"/$PAR/4/", "tot": b"/$TOT/300/"}[kind]
        name = key.split(b"/")[1]
        return bytes(b).replace(key, b"/" + name + b"/" + str(number).encode() + b"/", 1)

    @hypothesis.settings(max_examples=200, deadline=2000, database=None, derandomize=True)
    @hypothesis.given(
        kind=st.sampled_from(["truncate", "flip", "header_offset", "text_byte", "par", "tot"]),
        pos=st.integers(0, 10**6),
        value=st.integers(0, 255),
        number=st.one_of(st.integers(-5, 10), st.integers(0, 10**18)),
    )
    def check(kind, pos, value, number):
        out.write_bytes(mutate(base, kind, pos, value, number))
        for lenient in (False, True):
            try:
                sample = read_fcs(out, lenient=lenient)
            except HladrError:
                continue
            assert sample.events.nbytes <= 8 * len(base) + 1024  # no allocation far beyond the file
            assert sample.events.shape[1] == len(sample.channels)

    check()
