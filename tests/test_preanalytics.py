"""Pre-analytics: manifest columns, the sample's age, and the stability / protocol flags."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

import pytest

from hladr.batch import read_manifest
from hladr.errors import PreAnalyticsError
from hladr.preanalytics import STABILITY_WINDOWS, PreAnalytics, StabilityWindow, preanalytic_flags

ACQUIRED = datetime(2026, 3, 12, 20, 0)
MANIFEST = """file,collected_at,stained_at,tube,storage,protocol
edta_2h.fcs,2026-03-12T12:00,2026-03-12T14:00,EDTA,on ice,lyse-wash
edta_5h.fcs,2026-03-12T09:00,2026-03-12T14:00,K3EDTA,ice,lyse-wash
edta_30h.fcs,2026-03-11T08:00,2026-03-12T14:00,EDTA,ice,lyse-wash
chex_2h.fcs,2026-03-12T12:00,2026-03-12T14:00,Cyto-Chex BCT,room temperature,lyse-wash
chex_5h.fcs,2026-03-12T09:00,2026-03-12T14:00,cyto-chex,RT,lyse-wash
chex_30h.fcs,2026-03-11T08:00,2026-03-12T14:00,stabiliser,,lyse-wash
"""


def _records(tmp_path) -> dict[str, PreAnalytics]:
    path = tmp_path / "manifest.csv"
    path.write_text(MANIFEST, encoding="utf-8")
    return {row.file: PreAnalytics.from_fields(asdict(row)) for row in read_manifest(path)}


def test_ages_at_staining_and_acquisition_from_the_manifest(tmp_path):
    records = _records(tmp_path)
    # stained 14:00, acquired 20:00: the ages are the hours since collection (hand-counted)
    assert records["edta_2h.fcs"].ages(ACQUIRED) == {"age_at_staining_h": 2.0, "age_at_acquisition_h": 8.0}
    assert records["edta_5h.fcs"].ages(ACQUIRED) == {"age_at_staining_h": 5.0, "age_at_acquisition_h": 11.0}
    assert records["chex_30h.fcs"].ages(ACQUIRED) == {"age_at_staining_h": 30.0, "age_at_acquisition_h": 36.0}
    assert records["edta_5h.fcs"].to_dict(ACQUIRED) == {
        "collected_at": "2026-03-12T09:00:00",
        "stained_at": "2026-03-12T14:00:00",
        "tube": "edta",
        "storage": "ice",
        "protocol": "lyse-wash",
        "age_at_staining_h": 5.0,
        "age_at_acquisition_h": 11.0,
    }


def test_edta_on_ice_stained_after_4_h_is_flagged_a_stabiliser_tube_is_not(tmp_path):
    flags = {name: preanalytic_flags(rec, ACQUIRED) for name, rec in _records(tmp_path).items()}
    assert flags["edta_2h.fcs"] == []
    assert flags["edta_5h.fcs"] == ["stained_beyond_stability:5.0 h after collection, edta on ice window 4 h"]
    assert flags["edta_30h.fcs"] == [
        "stained_beyond_stability:30.0 h after collection, edta on ice window 4 h"
    ]
    assert flags["chex_2h.fcs"] == flags["chex_5h.fcs"] == flags["chex_30h.fcs"] == []


def test_the_stabiliser_window_is_configurable(tmp_path):
    chex = _records(tmp_path)["chex_30h.fcs"]
    stricter = tuple(w for w in STABILITY_WINDOWS if w.tube != "stabiliser") + (
        StabilityWindow("stabiliser", None, 24.0, "local validation"),
    )
    assert preanalytic_flags(chex, ACQUIRED, windows=stricter) == [
        "stained_beyond_stability:30.0 h after collection, stabiliser window 24 h"
    ]
    later = PreAnalytics(collected_at=datetime(2026, 3, 9, 8, 0), stained_at=ACQUIRED, tube="stabiliser")
    assert preanalytic_flags(later, ACQUIRED) == [
        "stained_beyond_stability:84.0 h after collection, stabiliser window 72 h"
    ]


def test_missing_times_other_tubes_and_protocols():
    assert preanalytic_flags(PreAnalytics(tube="edta", storage="ice"), ACQUIRED) == ["no_collection_time"]
    no_stain = PreAnalytics(collected_at=datetime(2026, 3, 12, 14, 0), tube="edta", storage="ice")
    assert preanalytic_flags(no_stain, ACQUIRED) == [
        "stability_unverified:acquired 6.0 h after collection, no staining time, edta on ice window 4 h"
    ]
    assert preanalytic_flags(no_stain, datetime(2026, 3, 12, 17, 0)) == []  # acquired within 3 h
    warm = PreAnalytics(
        collected_at=datetime(2026, 3, 12, 14, 0),
        tube="heparin",
        storage="room_temperature",
        protocol="lyse-no-wash",
    )
    assert preanalytic_flags(warm, ACQUIRED) == [
        "protocol_differs:lyse-no-wash vs reference lyse-wash",
        "no_stability_window:heparin at room temperature",
    ]
    assert preanalytic_flags(warm, ACQUIRED, reference_protocol="lyse-no-wash") == [
        "no_stability_window:heparin at room temperature"
    ]
    backwards = PreAnalytics(collected_at=ACQUIRED, stained_at=datetime(2026, 3, 12, 14, 0), tube="edta")
    assert preanalytic_flags(backwards, ACQUIRED) == [
        "preanalytic_times_inconsistent:collected, stained, acquired out of order"
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"collected_at": "12/03/2026 08:00"}, "collected_at '12/03/2026 08:00' is not an ISO 8601 time"),
        ({"anticoagulant": "serum"}, "unknown tube type 'serum'"),
        ({"storage": "warm"}, "unknown storage 'warm'"),
        ({"lysis": "ficoll"}, "unknown protocol 'ficoll'"),
    ],
)
def test_unreadable_fields_are_refused(fields, message):
    with pytest.raises(PreAnalyticsError, match=message):
        PreAnalytics.from_fields(fields)
