"""Stop requests: a signal becomes a flag for the length of a run; the previous handler comes back after."""

from __future__ import annotations

import os
import signal

import pytest

from synthgrad.errors import Interrupted
from synthgrad.stopping import StopRequests


def test_first_signal_is_a_request_the_second_stops_at_once_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"  # the process lives on
        with pytest.raises(Interrupted, match="stopped by SIGINT") as info:
            os.kill(os.getpid(), signal.SIGINT)
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_immediate_requests_stop_at_the_first_signal_with_the_shell_exit_code() -> None:
    with StopRequests(immediate=True), pytest.raises(Interrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143
