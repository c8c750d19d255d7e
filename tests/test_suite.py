"""The suite's own set-up: what `make test` relies on to run as it is meant to."""

import pytest


@pytest.mark.xdist_group("suite")
def test_an_xdist_group_reaches_the_scheduler(request):
    """`make test` runs with --dist loadgroup so the tests of one group (those sharing the session's local Ray) run
    on one worker; xdist reads the group from a suffix it adds to the test's id, which pytest 9.2 ignores."""
    if not getattr(request.config.option, "loadgroup", False):  # set on xdist's workers
        pytest.skip("not run by xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@suite"), request.node.nodeid
