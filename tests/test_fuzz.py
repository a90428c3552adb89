"""Fuzzing with a short budget: each target of ``gossip.fuzz`` over a few hundred inputs.

The inputs are deterministic (hypothesis derandomized, no example database):
valid frames, handshakes, AMP boxes and logs built by ``gossip.fuzz.inputs``,
then damaged byte by byte. A failing example prints the input's hex, which
``gossip-fuzz --replay TARGET HEX`` runs again. ``gossip-fuzz`` runs the same
targets for a long budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp

from gossip.client.responder import ClientProtocol
from gossip.core.frames import GossipFrame
from gossip.core.message import Message
from gossip.fuzz import cli, inputs, log_target
from gossip.fuzz.amp_target import AmpRun
from gossip.fuzz.harness import (
    KINDS,
    FuzzFailure,
    Mutation,
    apply_mutations,
    captured_log,
    check_log,
    warnings,
    watchdog,
)
from gossip.fuzz.targets import TARGETS
from gossip.fuzz.worker import Recorder, random_engine
from gossip.store.log import MAGIC, encode_record
from gossip.wire import codec

# Examples per target: together well under a minute on a loaded 2-core machine.
EXAMPLES = {"codec": 500, "peer": 200, "core": 250, "amp": 200, "log": 150}
# Seconds one input may take here before it counts as a hang.
INPUT_SECONDS = 10.0


def fuzz_test(target: str) -> Callable[[], None]:
    run = TARGETS[target]

    @settings(
        max_examples=EXAMPLES[target],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )
    @given(inputs.STRATEGIES[target]())
    def check(data: bytes) -> None:
        note = f"input ({target}): {data.hex()}"
        try:
            with watchdog(INPUT_SECONDS):
                run(data)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{note}") from e

    return check


def test_fuzz_frame_decoder() -> None:
    """Damaged and random bytes decode to a frame or ``BadFrame``, never another
    exception, and every frame decoded re-encodes to bytes that decode to itself."""
    fuzz_test("codec")()


def test_fuzz_peer_port() -> None:
    """A node fed a damaged peer stream, before or after a valid handshake, inbound or
    dialed, only closes that connection with a logged reason: no exception, no failure
    logged, framing buffer within one frame, nothing stored without a handshake or
    unlike its id, and another neighbour then links up and delivers."""
    fuzz_test("peer")()


def test_fuzz_core_receive() -> None:
    """The core given decoded damaged frames, links going up and down, ticks and
    submits returns effects or a refusal, never an exception; what it persists is what
    it claims, what it sends decodes to itself within the frame limit, its state
    stays within its bounds."""
    fuzz_test("core")()


def test_fuzz_client_port() -> None:
    """The client port fed damaged AMP boxes answers with declared errors only: nothing
    escapes, nothing is logged as critical or as a failure, reading resumes, and
    another client can then submit."""
    fuzz_test("amp")()


def test_fuzz_log_recovery() -> None:
    """A damaged or arbitrary log file opens with at least its valid prefix in order
    (or is refused with ``StoreError`` and left untouched); the recovered log opens
    clean with the same records and takes an append."""
    fuzz_test("log")()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seed_corpus_is_deterministic(target: str) -> None:
    """The long run's seed corpus is the same every time (a failure found from it can
    be found again)."""
    assert inputs.seeds(target, 5) == inputs.seeds(target, 5)


# -- inputs the fuzzers found (each failed before its fix) ------------------------


def test_empty_gossip_frame_round_trips() -> None:
    """An empty Gossip batch (``1a 00``) decodes, and encoding it gives bytes that decode
    to it again (the encoder used to leave the empty batch out: zero bytes, no frame)."""
    frame = codec.decode(bytes.fromhex("1a00"))
    assert frame == GossipFrame(())
    assert codec.decode(codec.encode(frame)) == frame


def _client() -> tuple[ClientProtocol, StringTransport, MemoryReactorClock]:
    run = AmpRun()
    proto, transport = run.connect()
    return proto, transport, run.reactor


@pytest.mark.parametrize("key", [amp.ANSWER, amp.ERROR])
def test_command_box_that_also_answers_is_refused_without_an_exception(key: bytes) -> None:
    """A client box carrying ``_command`` and an ``_answer`` (or ``_error``) for a question
    the node never asked is a bad request: logged within its rate, no exception out of
    ``dataReceived`` (AMP looked the id up among the node's questions: KeyError), and the
    connection goes on serving."""
    proto, transport, reactor = _client()
    box = amp.AmpBox({amp.COMMAND: b"Status", key: b"1", amp.ASK: b"2"})
    with captured_log() as events:
        proto.dataReceived(box.serialize())
        proto.dataReceived(amp.AmpBox({amp.COMMAND: b"Status", amp.ASK: b"3"}).serialize())
        reactor.advance(0)
    check_log(events)
    answers = amp.parseString(transport.value())
    assert [b.get(amp.ANSWER) for b in answers] == [b"3"]
    assert any("a box that is not a command" in line for line in warnings(events))


def test_command_name_that_is_not_ascii_is_unhandled() -> None:
    """A command name with non-ASCII bytes is answered as an unknown command, as any
    other unknown name is (AMP's lookup decoded it as ASCII and raised)."""
    proto, transport, reactor = _client()
    with captured_log() as events:
        proto.dataReceived(amp.AmpBox({amp.COMMAND: b"Sub\x80", amp.ASK: b"1"}).serialize())
        reactor.advance(0)
    check_log(events)
    (answer,) = amp.parseString(transport.value())
    assert answer[amp.ERROR] == b"1"
    assert answer[amp.ERROR_CODE] == amp.UNHANDLED_ERROR_CODE


DAMAGE = [k for k in KINDS if k != "truncate"]


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(
    messages=st.lists(inputs.MESSAGES, min_size=1, max_size=6),
    which=st.integers(0, 5),
    damage=st.lists(
        st.tuples(st.sampled_from(DAMAGE), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1)),
        min_size=1,
        max_size=4,
    ),
)
def test_log_recovery_keeps_every_record_but_the_damaged_one(
    messages: list[Message], which: int, damage: list[Mutation]
) -> None:
    """Damage confined to one record of a log (bits flipped, bytes inserted or deleted
    inside it) costs at most that record: every other record is recovered, in order."""
    records = [encode_record(m) for m in messages]
    k = which % len(records)
    damaged = apply_mutations(records[k], damage)
    content = MAGIC + b"".join(records[:k]) + damaged + b"".join(records[k + 1 :])
    with watchdog(INPUT_SECONDS):
        got = log_target.recovered_ids(content)
    others = [m.id for i, m in enumerate(messages) if i != k]
    assert set(others) <= set(got), f"log: {content.hex()}"
    # In order, but for the damaged record's own id: damage such as a byte inserted
    # before it leaves that record intact, so it may be recovered (first) too.
    expected = [mid for mid in dict.fromkeys(others) if mid != messages[k].id]
    assert [mid for mid in got if mid in set(expected)] == expected, f"log: {content.hex()}"


# -- the long-run command ----------------------------------------------------------


def test_random_engine_counts_inputs_and_saves_each_distinct_failure(tmp_path: Path) -> None:
    """The long run's random engine counts every input it tries and saves one
    reproducer (hex, and the traceback) per distinct failure, not one per input."""

    def target(data: bytes) -> None:
        if data[:1] == b"\x00":
            raise FuzzFailure("starts with a zero byte")

    rec = Recorder("demo", tmp_path, tmp_path / "status.json")
    random_engine(target, rec, [b"\x00abc", b"xyz"], seconds=0.5, seed=3)
    rec.write()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["inputs"] == rec.inputs > 2
    (failure,) = status["failures"]
    assert failure["signature"] == "FuzzFailure: starts with a zero byte"
    saved = (tmp_path / failure["file"]).read_text().strip()
    assert bytes.fromhex(saved)[:1] == b"\x00"
    assert "starts with a zero byte" in (tmp_path / failure["file"]).with_suffix(".txt").read_text()


def test_replay_runs_a_saved_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gossip-fuzz --replay TARGET FILE`` runs a saved input again: status 0 and one
    line when it passes, 1 and the traceback when it fails."""
    saved = tmp_path / "codec-x.hex"
    saved.write_text("1a00\n")
    assert cli.main(["--replay", "codec", str(saved)]) == 0
    assert "codec: input of 2 bytes passes" in capsys.readouterr().out
    bad = amp.AmpBox({amp.COMMAND: b"Status", amp.ANSWER: b"1"}).serialize()
    assert cli.main(["--replay", "amp", "00" + bad.hex()]) == 0
    assert cli.main(["--replay", "log", "00" + b"not a log at all".hex()]) == 0

    def failing(data: bytes) -> None:
        raise FuzzFailure(f"{len(data)} bytes: no")

    monkeypatch.setitem(TARGETS, "codec", failing)
    assert cli.main(["--replay", "codec", str(saved)]) == 1
    assert "FuzzFailure: 2 bytes: no" in capsys.readouterr().err
