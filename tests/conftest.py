"""Test-wide setup: the seed policy of the property tests (Hypothesis).

Locally they search at random (new examples each run; a failure found is saved in
``.hypothesis/`` and replayed first until it passes). Where the environment variable ``CI`` is
set and not empty (``.ci/run`` runs with ``CI=true``) they are derandomized: the same examples
on every run and no example database, so a red CI is a failure of the change under test, and
``CI=true python -m pytest`` reproduces it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: The profile of a CI run; other runs keep Hypothesis's "default" (random search).
CI_PROFILE = "ci"

# Recent Hypothesis releases load a like profile themselves where CI is set; the project
# supports older ones (>= 6.90), so it is stated here. No deadline and no too-slow check:
# a shared CI machine is slow at times, which is not a failure of the code.
settings.register_profile(
    CI_PROFILE,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(CI_PROFILE if os.environ.get("CI") else "default")
