"""Hostile registry documents: the sans-IO parsers either parse or raise FormatError."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from obdfuse.errors import FormatError
from obdfuse.registry import manifest as mf
from obdfuse.registry.auth import parse_challenge

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config", "layers",
                                       "digest", "size", "annotations", "manifests",
                                       "platform", "os", "architecture", "x"]),
                      children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_manifest_and_index_parsers_never_crash(doc):
    data = json.dumps(doc).encode()
    for parse in (mf.parse_manifest, mf.parse_index):
        with contextlib.suppress(FormatError):
            parse(data, mf.OCI_MANIFEST)
    with contextlib.suppress(FormatError):
        mf.parse_config_diff_ids(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_cleanly(data):
    try:
        mt = mf.media_type_of(data, None)
        mf.parse_manifest(data, mt)
    except FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_challenge_parser_never_crashes(text):
    challenge = parse_challenge(text)
    assert challenge is None or isinstance(challenge.params, dict)
