"""Rewrites config/session-manager.toml from the settings' definitions (run after adding one)."""

from pathlib import Path

from session_manager.config import reference_file

target = Path(__file__).resolve().parents[1] / "config" / "session-manager.toml"
target.write_text(reference_file(), encoding="utf-8")
print(f"wrote {target}")
