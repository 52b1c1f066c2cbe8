"""The connection table (transport.admission): outsiders never take the validators'
reserve, one address never takes more than its share, and the books always balance."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from anna_trio.models import Limits
from anna_trio.transport.admission import ConnectionTable, Counts, Refusal, Slot

LIMITS = Limits(
    max_connections=10,
    max_connections_per_address=3,
    validator_connection_reserve=4,
    max_pending_handshakes=2,
)
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9")


def test_outsiders_stop_at_the_reserve_and_validators_fill_it() -> None:
    table = ConnectionTable()
    outsiders = [
        table.admit(a, trusted=False, handshake=False, limits=LIMITS) for a in ADDRESSES[:2] * 3
    ]
    assert all(isinstance(slot, Slot) for slot in outsiders)
    assert table.admit("10.0.0.3", trusted=False, handshake=False, limits=LIMITS) is (
        Refusal.CONNECTIONS
    )
    for _ in range(4):
        assert isinstance(
            table.admit("10.0.0.9", trusted=True, handshake=False, limits=LIMITS), Slot
        )
    assert table.admit("10.0.0.9", trusted=True, handshake=False, limits=LIMITS) is (
        Refusal.CONNECTIONS
    )


def test_one_address_gets_its_share_only() -> None:
    table = ConnectionTable()
    for _ in range(3):
        assert isinstance(
            table.admit("10.0.0.1", trusted=False, handshake=False, limits=LIMITS), Slot
        )
    assert table.admit("10.0.0.1", trusted=False, handshake=False, limits=LIMITS) is Refusal.ADDRESS
    assert isinstance(table.admit("10.0.0.2", trusted=False, handshake=False, limits=LIMITS), Slot)


def test_outsiders_handshakes_are_bounded_validators_are_not() -> None:
    table = ConnectionTable()
    first = table.admit("10.0.0.1", trusted=False, handshake=True, limits=LIMITS)
    table.admit("10.0.0.2", trusted=False, handshake=True, limits=LIMITS)
    assert table.admit("10.0.0.3", trusted=False, handshake=True, limits=LIMITS) is (
        Refusal.HANDSHAKES
    )
    assert isinstance(table.admit("10.0.0.9", trusted=True, handshake=True, limits=LIMITS), Slot)
    assert isinstance(first, Slot)
    assert table.handshake_done(first, trusted=False, limits=LIMITS) is None
    assert isinstance(table.admit("10.0.0.3", trusted=False, handshake=True, limits=LIMITS), Slot)
    assert table.statistics().handshakes == 3


def test_an_outsider_from_a_validators_address_is_judged_after_the_handshake() -> None:
    """Trusted by address, the certificate says otherwise: it must fit the outsiders'
    limits, or close; an outsider's address with a validator's certificate moves over."""
    table = ConnectionTable()
    for _ in range(3):
        table.admit("10.0.0.9", trusted=False, handshake=False, limits=LIMITS)
    masquerade = table.admit("10.0.0.9", trusted=True, handshake=True, limits=LIMITS)
    assert isinstance(masquerade, Slot)
    assert table.handshake_done(masquerade, trusted=False, limits=LIMITS) is Refusal.ADDRESS
    table.release(masquerade)
    roaming = table.admit("10.0.0.1", trusted=False, handshake=True, limits=LIMITS)
    assert isinstance(roaming, Slot)
    assert table.handshake_done(roaming, trusted=True, limits=LIMITS) is None
    assert table.statistics() == Counts(trusted=1, others=3, handshakes=0)


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(ADDRESSES), st.booleans(), st.booleans()),
        st.tuples(st.just("done"), st.integers(0, 40), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 40)),
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(operations=OPERATIONS)
def test_any_sequence_keeps_the_bounds_and_the_books(operations: list[tuple[Any, ...]]) -> None:
    """Whatever connects, finishes its handshake or leaves, in any order: outsiders stay
    within their share of slots and per address, outsiders' handshakes within theirs,
    a validator is refused only when every slot is taken, and releasing everything
    empties the table."""
    table = ConnectionTable()
    open_slots: list[Slot] = []
    for operation in operations:
        if operation[0] == "admit":
            _, address, trusted, handshake = operation
            full = len(open_slots) >= LIMITS.max_connections
            slot = table.admit(address, trusted=trusted, handshake=handshake, limits=LIMITS)
            if isinstance(slot, Slot):
                open_slots.append(slot)
            elif trusted:
                assert full and slot is Refusal.CONNECTIONS
        elif operation[0] == "done" and open_slots:
            slot = open_slots[operation[1] % len(open_slots)]
            refused = slot.handshaking and table.handshake_done(
                slot, trusted=operation[2], limits=LIMITS
            )
            if refused:
                table.release(slot)
                open_slots.remove(slot)
        elif operation[0] == "release" and open_slots:
            table.release(open_slots.pop(operation[1] % len(open_slots)))
        others = [s for s in open_slots if not s.trusted]
        counts = table.statistics()
        assert counts.trusted + counts.others == len(open_slots) <= LIMITS.max_connections
        assert counts.others == len(others)
        assert counts.others <= LIMITS.max_connections - LIMITS.validator_connection_reserve
        for address in ADDRESSES:
            assert sum(s.address == address for s in others) <= LIMITS.max_connections_per_address
        assert sum(s.handshaking for s in others) <= LIMITS.max_pending_handshakes
        assert counts.handshakes == sum(s.handshaking for s in open_slots)
    for slot in open_slots:
        table.release(slot)
    assert table.statistics() == Counts(0, 0, 0)
    assert not table._per_address
