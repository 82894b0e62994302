"""read_fcs on every real file of the corpus, checked against flowio (or FlowCal where flowio fails)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hladr.errors import FCSDataError, FCSHeaderError, HladrError
from hladr.fcs import read_fcs, read_metadata

from .conftest import real_files, require_real

#: Files that are genuinely broken, with the error they must raise (see docs/fcs.md).
BROKEN = {
    "corrupted.fcs": FCSHeaderError,  # 10 bytes: not an FCS file at all
    "sample_header.fcs": FCSDataError,  # HEADER+TEXT only; the DATA segment was cut off
}

FILES = real_files()


def _peer_readings(path, lenient_options: bool):
    """Every array flowio (default, then its lenient options) and FlowCal return for the file."""
    import FlowCal
    import flowio

    options = [{}]
    if lenient_options:
        options += [
            {"ignore_offset_discrepancy": True},
            {"ignore_offset_error": True},
            {"ignore_offset_discrepancy": True, "ignore_offset_error": True},
            {"ignore_offset_discrepancy": True, "use_header_offsets": True},
            {"ignore_offset_discrepancy": True, "use_header_offsets": True, "ignore_offset_error": True},
        ]
    readers = [lambda kw=kw: flowio.FlowData(str(path), **kw).as_array(preprocess=False) for kw in options]
    readers.append(lambda: FlowCal.io.FCSFile(str(path)).data)
    out = {}
    for name, read in zip([f"flowio{kw}" for kw in options] + ["FlowCal"], readers):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = np.asarray(read(), dtype=np.float64)
        except Exception:  # noqa: BLE001 - a peer failing just means "try the next one"
            continue
    return out


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_real_file_opens_and_matches_peer(path):
    require_real()
    if path.name in BROKEN:
        with pytest.raises(BROKEN[path.name]) as info:
            read_fcs(path, lenient=True)
        assert str(path) in str(info.value)
        return
    sample = read_fcs(path, dataset=0, lenient=True)
    n, p = sample.events.shape
    assert p == len(sample.channels) == len(sample.markers)
    assert len(sample.sha256) == 64
    meta = read_metadata(path, dataset=0, lenient=True)
    assert meta.channels == sample.channels and meta.events.shape == (0, p)
    stored = sample.raw if sample.raw is not None else sample.events
    peers = _peer_readings(path, lenient_options=bool(sample.repairs))
    if not peers:
        pytest.skip("neither flowio nor FlowCal reads this file")
    if not sample.repairs and "flowio{}" in peers:  # a compliant file: flowio's default reading is the truth
        peers = {"flowio{}": peers["flowio{}"]}
    # on non-compliant files the peers disagree among themselves (HEADER vs TEXT offsets): one must match
    matching = [
        name
        for name, peer in peers.items()
        if peer.shape == stored.shape
        and all(np.allclose(stored[:, j], peer[:, j], rtol=1e-6) for j in range(p))
    ]
    assert matching, f"{path.name}: no peer agrees ({', '.join(peers)} read it)"


def test_strict_mode_names_the_repair_needed():
    require_real()
    needing = []
    for path in FILES:
        if path.name in BROKEN:
            continue
        sample = read_fcs(path, dataset=0, lenient=True)
        if sample.repairs:
            needing.append((path, sample.repairs))
    assert needing, "the real corpus holds files with instrument defects"
    for path, repairs in needing[:10]:
        with pytest.raises(HladrError) as info:
            read_fcs(path, dataset=0)
        assert "lenient=True" in str(info.value)
        assert any(name in str(info.value) for name in repairs)


def test_lmd_default_is_full_resolution_dataset():
    require_real()
    lmd = [p for p in FILES if p.suffix.lower() == ".lmd"]
    if not lmd:
        pytest.skip("no LMD file in the corpus")
    for path in lmd:
        sample = read_fcs(path, lenient=True)
        if sample.n_datasets > 1:
            assert sample.version.startswith("3")
            first = read_fcs(path, dataset=0, lenient=True)
            assert first.version.startswith("2")
            assert sample.n_events == first.n_events


def test_files_no_peer_reads_match_hand_derived_values():
    """The five files neither flowio nor FlowCal reads, against hand-derived values (see INDEX.md)."""
    real = require_real()
    # Beckman FC500 LMD: FCS 2.0 data set of 10-bit values in 16-bit words, little-endian, & 0x3FF
    lmd = real / "cytoflow/instruments/Beckman Coulter - Cytomics FC500.LMD"
    first = read_fcs(lmd, dataset=0, lenient=True)
    assert "non_byte_width_as_16bit" in first.repairs
    np.testing.assert_array_equal(first.raw[0], [411, 273, 184, 134])
    blob = lmd.read_bytes()
    words = np.frombuffer(blob, "<u2", count=4 * first.n_events, offset=int(blob[26:34]))  # HEADER offset
    np.testing.assert_array_equal(first.raw, (words & 0x3FF).reshape(-1, 4))
    # ... whose default data set is the FCS 3.0 one, equal to flowio's second data set
    import flowio

    full = read_fcs(lmd, lenient=True)
    assert (full.dataset, full.version, full.n_datasets) == (1, "3.0", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = flowio.read_multiple_data_sets(str(lmd), ignore_offset_error=True)[1]
    peer = peer.as_array(preprocess=False)
    np.testing.assert_allclose(full.raw if full.raw is not None else full.events, peer, rtol=1e-6)
    # blank HEADER data offsets (a > 99,999,999-byte file): same bytes as the Fortessa file it was made from
    fortessa = real / "fcsparser/FlowCytometers/Fortessa/FCS_3.0_Fortessa_PBS_Specimen_001_A1_A01.fcs"
    large = read_fcs(real / "fcsparser/FlowCytometers/fake_large_fcs/fake_large_fcs.fcs")
    np.testing.assert_array_equal(large.events, read_fcs(fortessa).events)
    # keyword names padded with spaces ("   $DATATYPE"): little-endian uint16 read straight from $BEGINDATA
    padded = [
        "instruments/Partec - CyFlow v2.9.fcs",
        "genome_size/PU87@2+B200.fcs",
        "genome_size/PU88@3+B200(2).fcs",
    ]
    for name in padded:
        path = real / "cytoflow" / name
        with pytest.raises(HladrError, match="keyword_whitespace"):
            read_fcs(path)
        sample = read_fcs(path, lenient=True)
        stored = sample.raw if sample.raw is not None else sample.events
        n, p = stored.shape
        assert n == int(sample.keywords["$TOT"]) and p == int(sample.keywords["$PAR"])
        begin = int(sample.keywords["$BEGINDATA"])
        words = np.frombuffer(path.read_bytes(), "<u2", count=n * p, offset=begin)
        np.testing.assert_array_equal(stored, words.reshape(n, p))
