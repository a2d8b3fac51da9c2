"""A task module that must never be imported: the allowlist refuses it before any import."""
raise RuntimeError("tripwire: a daemon imported a task module outside its allowlist")


def run(records, params):  # pragma: no cover - unreachable by design
    return records
