"""One TLS-failure classifier for both sides (transport.tlsfailure): any error, however
wrapped, is one label of a fixed set; this side's verify codes name what was wrong, a
peer's alert is `rejected_by_peer`."""

from __future__ import annotations

import ssl

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings

from anna_trio.transport.tlsfailure import (
    TLS_FAILURE_REASONS,
    classify_tls_failure,
    failure_label,
)


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason)
    error.reason = reason
    return error


@settings(max_examples=300)
@given(
    error=st.one_of(
        st.integers(-1, 200).map(_verify_error),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_3", max_size=40).map(_ssl_error),
        st.text(max_size=40).map(_ssl_error),
        st.builds(ConnectionResetError),
        st.builds(ValueError, st.text(max_size=5)),
    ),
    wrap=st.sampled_from(["bare", "cause", "context", "group"]),
)
def test_any_error_however_wrapped_is_one_known_label(error: Exception, wrap: str) -> None:
    """The same label bare or wrapped (trio reports TLS errors as BrokenResourceError
    from the ssl.SSLError), always one of TLS_FAILURE_REASONS, "other" for non-TLS."""
    bare = classify_tls_failure(error)
    wrapped: BaseException = trio.BrokenResourceError()
    if wrap == "cause":
        wrapped.__cause__ = error
    elif wrap == "context":
        wrapped.__context__ = error
    elif wrap == "group":
        wrapped = ExceptionGroup("x", [ValueError(), error])
    else:
        wrapped = error
    assert classify_tls_failure(wrapped) == bare
    assert bare in TLS_FAILURE_REASONS
    if not isinstance(error, ssl.SSLError):
        assert bare == "other"
    elif not isinstance(error, ssl.SSLCertVerificationError) and "_ALERT_" in error.reason:
        assert bare == "rejected_by_peer"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (_verify_error(9), "certificate_not_yet_valid"),
        (_verify_error(10), "certificate_expired"),
        (_verify_error(23), "certificate_revoked"),
        (_verify_error(3), "crl_unavailable"),
        (_verify_error(20), "unknown_ca"),
        (_verify_error(64), "hostname_mismatch"),
        (_verify_error(50), "bad_certificate"),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no_certificate"),
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "rejected_by_peer"),
        (_ssl_error("SSLV3_ALERT_CERTIFICATE_REVOKED"), "rejected_by_peer"),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "rejected_by_peer"),
        (_ssl_error("HTTP_REQUEST"), "protocol"),
        (_ssl_error("WRONG_VERSION_NUMBER"), "protocol"),
        (ssl.SSLEOFError(8, "EOF"), "protocol"),
        (_ssl_error("SOMETHING_NEW"), "other"),
    ],
)
def test_examples(error: ssl.SSLError, reason: str) -> None:
    assert classify_tls_failure(error) == reason


@pytest.mark.parametrize(
    ("refusal", "label"),
    [
        ("cn_mismatch: got node_002, expected node_001", "cn_mismatch"),
        ("fingerprint_mismatch", "fingerprint_mismatch"),
        ("no_certificate", "no_certificate"),
        ("identity_mismatch", "other"),
        ("", "other"),
    ],
)
def test_a_refusal_with_detail_keeps_only_its_kind(refusal: str, label: str) -> None:
    assert failure_label(refusal) == label
