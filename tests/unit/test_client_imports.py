"""The API client, and the SDK that registers with it, load nothing of the manager's daemon."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_client_and_the_sdk_import_nothing_else_of_the_manager() -> None:
    script = (
        "import json, sys\n"
        "import session_manager.client, session_manager.sdk\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('session_manager'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    loaded = {name for name in json.loads(out) if not name.startswith("session_manager.sdk")}
    # session_manager/__init__ loads `logs` (its safe logger class) for every module of ours.
    assert loaded == {"session_manager", "session_manager.logs", "session_manager.client"}
