"""blade_mega/engine/peers.py on a real TCPStore, ranks as threads: heartbeats name the rank that
stopped answering, ranks that failed themselves are not blamed, a dead store is told apart,
and of the ranks failing alike only the lowest prints."""

import datetime
import threading
import time

import pytest
import torch

from blade_mega.engine import peers as peers_module
from blade_mega.engine.peers import Peers


@pytest.fixture
def store():
    return torch.distributed.TCPStore("127.0.0.1", 0, 1, True,
                                      timeout=datetime.timedelta(seconds=10))


def ranks(store, world=3):
    return [Peers(store, "run1/peers", r, world, 0.5) for r in range(world)]


def test_a_rank_whose_heartbeat_stops_is_named(store, monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(peers_module, "STALE_S", 0.5)
    group = ranks(store)
    for peer in group:
        peer.start()
    group[1].stop()  # rank 1 hangs: no more beats
    time.sleep(0.8)
    silent = group[0].silent_ranks()
    assert list(silent) == [1] and silent[1] > 0.5
    # rank 2 then fails too (it is exiting, its beat stops): still only rank 1 is to blame
    assert list(group[2].silent_ranks()) == [1]
    group[0].stop()
    group[2].stop()
    time.sleep(0.8)
    assert list(group[2].silent_ranks()) == [1]  # rank 0 reported a failure of its own


class GoneStore:
    """What a store whose host is SIGSTOPped or dead does to a client: time out."""

    def clone(self):
        raise RuntimeError("Timed out after 2 seconds waiting for clients")


def test_an_unreachable_store_is_none():
    peer = Peers(GoneStore(), "run1/peers", 1, 2, 1.0)
    assert peer.silent_ranks() is None
    assert peer.first_to_report("boom") is True  # without a store every rank prints


def test_only_the_lowest_failing_rank_reports(store):
    group = ranks(store)
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(
        r, group[r].first_to_report("same message"))) for r in (2, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {1: True, 2: False}
    assert group[2].first_to_report("another message") is True  # alone with it


class FakePeers:
    timeout_minutes = 0.5

    def __init__(self, silent, first=True):
        self.silent, self.first, self.asked = silent, first, []

    def silent_ranks(self):
        return self.silent

    def first_to_report(self, message):
        self.asked.append(message)
        return self.first


GLOO_TIMEOUT = ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                "Timed out waiting 30000ms for recv operation to complete")


def cli_error(monkeypatch, capsys, peers, err) -> tuple[int, str]:
    from blade_mega import errors

    monkeypatch.setattr(errors, "_peers", peers)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("BLADE_DEBUG", raising=False)

    def main():
        raise err

    with pytest.raises(SystemExit) as exit_:
        errors.run_cli(main)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("silent, says", [
    ({1: 38.4}, "rank 1 stopped answering (no heartbeat for 38 s); check its log and host, "
                "raise --distributed-timeout-minutes (now 0.5) if it was only slow, then resume"),
    ({1: 40.0, 3: 39.0}, "ranks 1, 3 stopped answering"),
    (None, "the rendezvous store does not answer either, so rank 0 (or the launcher"),
    ({}, "every rank still answers, so one is stuck or slow"),
])
def test_a_timed_out_collective_names_the_silent_rank_and_the_fix(monkeypatch, capsys, silent,
                                                                    says):
    code, stderr = cli_error(monkeypatch, capsys, FakePeers(silent), RuntimeError(GLOO_TIMEOUT))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("error: rank 2: a collective failed (Timed out waiting 30000ms")
    assert says in stderr and stderr.endswith("BLADE_DEBUG=1 prints the traceback\n")


def test_a_rank_that_is_not_the_lowest_to_fail_prints_nothing(monkeypatch, capsys):
    from blade_mega.errors import UserError

    peers = FakePeers({}, first=False)
    code, stderr = cli_error(monkeypatch, capsys, peers, UserError("bad --flag; fix it"))
    assert (code, stderr, peers.asked) == (2, "", ["bad --flag; fix it"])
