"""``smalti serve``: read-only, credentialed access to runs for auditors (docs/auditing.md)."""
